"""The data-free different-base check: real tiny models, the default bound."""

from __future__ import annotations

from pathlib import Path

import torch
from models import base_state, finetune, write_model

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.plausibility import DEFAULT_MAX_RELATIVE_DISTANCE, distance_from_base


def test_fine_tunes_are_within_the_default_bound_and_unrelated_models_never(tmp_path: Path):
    base = base_state()
    b = Checkpoint.open(write_model(base, tmp_path / "base"))
    for seed in range(1, 6):  # the suite's fine-tunes are strong ones (r ≈ 0.35); real ones are ~0.01-0.05
        d = distance_from_base(b, Checkpoint.open(write_model(finetune(base, seed), tmp_path / f"ft{seed}")))
        assert 0 < d.median < DEFAULT_MAX_RELATIVE_DISTANCE and d.tensors == 13, d
    g = torch.Generator().manual_seed(0)
    permuted = {k: v.flatten()[torch.randperm(v.numel(), generator=g)].reshape(v.shape) if v.is_floating_point()
                else v for k, v in base.items()}  # the very same values, in other places
    unrelated = [base_state(seed=s) for s in (7, 8, 9)] + [permuted]
    for i, state in enumerate(unrelated):
        d = distance_from_base(b, Checkpoint.open(write_model(state, tmp_path / f"other{i}")))
        assert d.median > 2 * DEFAULT_MAX_RELATIVE_DISTANCE and abs(d.median - 2 ** 0.5) < 0.15, d
    same = distance_from_base(b, b)
    assert same.median == 0.0 and same.max == 0.0


def test_the_report_script_prints_the_verdicts(tmp_path: Path):
    import subprocess
    import sys

    base = base_state()
    b = write_model(base, tmp_path / "base")
    ft = write_model(finetune(base, 1), tmp_path / "ft")
    other = write_model(base_state(seed=7), tmp_path / "other")
    script = Path(__file__).parent.parent / "scripts" / "distance_from_base.py"
    out = subprocess.run([sys.executable, str(script), str(b), str(ft), str(other)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 2 and " ok " in out[0] and out[0].endswith(str(ft))
    assert " REJECTED " in out[1] and out[1].endswith(str(other))
