"""Matrices merged in parallel: the output, the lineage record and the scores do not depend on the number of
workers (each matrix is one thread's arithmetic), for dense and LoRA arrivals and every NUFILT profile."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from engine_checks import leftovers
from peft_models import lora_adapter, tiny_bert

from nufilt_core.errors import NufiltError
from nufilt_core.merge import MergeRequest, ScoreRequest, merge_step
from nufilt_core.methods.nufilt import Nufilt


def weights_hash(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def chain(base: Path, arrivals: list[Path], out: Path, workers: int, options: dict) -> list[tuple]:
    """Each step's weights hash, record summary and method state, and surrogate scores."""
    previous, got = None, []
    for t, arrival in enumerate(arrivals, 1):
        step = out / f"m{t}"
        result = merge_step(MergeRequest(base=base, checkpoint=arrival, output=step, previous=previous,
                                         options=options if t == 1 else {}, workers=workers, check_first=False,
                                         scores=ScoreRequest()))
        got.append((weights_hash(step), result.record.summary, result.record.method_state, result.scores))
        previous = step
    return got


@pytest.mark.parametrize("profile", ["paper", "plus-iso"])
def test_any_number_of_workers_writes_the_same_bytes(tiny: dict[str, Path], tmp_path: Path, profile: str):
    arrivals = [tiny["t1"], tiny["t2"], tiny["t3"]]
    options = {"profile": profile, "iters": 5}
    one = chain(tiny["base"], arrivals, tmp_path / "one", 1, options)
    for workers in (2, 3):
        assert chain(tiny["base"], arrivals, tmp_path / f"w{workers}", workers, options) == one, workers
    assert one[-1][1]["filtered_tensors"] > 1  # several matrices, so several were in flight at once
    assert torch.get_num_threads() >= 1  # the step gave torch its threads back


def test_lora_arrivals_merge_in_parallel_to_the_same_bytes(tmp_path: Path):
    base = tiny_bert(tmp_path / "base")
    adapters = [lora_adapter(base, tmp_path / f"a{i}", seed=i, r=4, lora_alpha=8,
                             target_modules=["query", "value", "dense"]) for i in (1, 2)]
    one = chain(base, adapters, tmp_path / "one", 1, {"iters": 5})
    assert chain(base, adapters, tmp_path / "two", 2, {"iters": 5}) == one


def test_a_failing_matrix_in_a_worker_fails_the_step_and_leaves_nothing(tiny: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A fault raised in a worker thread reaches the caller, naming the tensor; no output, no temporary folder."""
    real = Nufilt.merge

    def faulty(self: Nufilt, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        if name == "encoder.layer.1.attention.self.key.weight":
            raise NufiltError(f"{name}: out of memory")  # what a worker's fault looks like to the engine
        return real(self, name, *tensors)

    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=tmp_path / "m1", workers=2))
    monkeypatch.setattr(Nufilt, "merge", faulty)  # a fault of one matrix's work, caused where it runs
    with pytest.raises(NufiltError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight: out of memory"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t2"], output=tmp_path / "m2",
                                previous=tmp_path / "m1", workers=2))
    assert not (tmp_path / "m2").exists() and leftovers(tmp_path) == []
