from __future__ import annotations

import os

# Tiny models gain nothing from threads, and torch's threads spin-wait for each other when the
# cores are busy (CI runs several processes at once): one thread here and in every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py and other helpers

from models import base_state, finetune, write_model


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    """A base and three fine-tunes of a tiny BERT-shaped model, as safetensors folders."""
    base = base_state()
    paths = {"base": write_model(base, tmp_path / "base")}
    for i in range(1, 4):
        paths[f"t{i}"] = write_model(finetune(base, i), tmp_path / f"t{i}")
    return paths


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `nufilt` console script."""
    exe = Path(sys.executable).parent / "nufilt"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"nufilt {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def load(folder: Path) -> dict[str, torch.Tensor]:
    """Read a model back with the safetensors library itself (an independent reader)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
