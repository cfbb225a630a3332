from __future__ import annotations

import os

# Tiny models gain nothing from threads, and torch's threads spin-wait for each other when the
# cores are busy (CI runs several processes at once): one thread here and in every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
from pathlib import Path

import pytest

# the helper modules beside this file (models.py, cli_runner.py, daemon_harness.py, ...): tests import
# them by name; this file holds only fixtures
sys.path.insert(0, str(Path(__file__).parent))

from models import base_state, finetune, write_model


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    """A base and three fine-tunes of a tiny BERT-shaped model, as safetensors folders."""
    base = base_state()
    paths = {"base": write_model(base, tmp_path / "base")}
    for i in range(1, 4):
        paths[f"t{i}"] = write_model(finetune(base, i), tmp_path / f"t{i}")
    return paths
