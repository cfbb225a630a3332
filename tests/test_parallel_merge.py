"""Matrices merged in parallel: the output, the lineage record and the scores do not depend on the number of
workers (each matrix is one thread's arithmetic), for dense and LoRA arrivals and every NUFILT profile."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from engine_checks import leftovers
from models import base_state, finetune, write_model
from peft_models import lora_adapter, tiny_bert

from nufilt_core.errors import CheckpointError, NufiltError
from nufilt_core.merge import MergeRequest, ScoreRequest, _Window, merge_step
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


def test_the_window_keeps_a_matrix_per_slot_and_lets_small_ones_pass_a_big_one():
    equal = _Window(slots=2, largest=100)
    for numel, heavy in [(100, True), (4, False), (100, True), (4, False)]:  # weight, bias, weight, bias
        assert equal.fits(numel, heavy)
        equal.add(numel, heavy)
    assert not equal.fits(100, True)  # a third matrix waits for the first
    assert equal.fits(4, False)  # a bias does not
    uneven = _Window(slots=2, largest=400)
    uneven.add(400, True)  # a wide matrix at the head
    for _ in range(4):  # the next block's four narrow ones run meanwhile
        assert uneven.fits(100, True)
        uneven.add(100, True)
    assert not uneven.fits(100, True)
    uneven.remove(400, True)
    assert uneven.fits(400, True)
    assert not _Window(slots=0, largest=0).fits(1, False)  # no pool: each tensor written before the next


def test_the_check_pass_reads_the_inputs_side_by_side_and_names_the_first_bad_one(tmp_path: Path):
    """With two workers the inputs are checked at once; NaN in the base and the checkpoint is reported as the
    base's, as a pass over one input at a time would, and nothing is written."""
    base = base_state()
    bad_base, bad_new = dict(base), finetune(base, 1)
    for state in (bad_base, bad_new):
        state["encoder.layer.1.attention.self.key.weight"] = state["encoder.layer.1.attention.self.key.weight"].clone()
        state["encoder.layer.1.attention.self.key.weight"][3, 4] = float("nan")
    write_model(bad_base, tmp_path / "base")
    write_model(bad_new, tmp_path / "new")
    with pytest.raises(CheckpointError, match="base holds NaN") as err:
        merge_step(MergeRequest(base=tmp_path / "base", checkpoint=tmp_path / "new", output=tmp_path / "out",
                                workers=2))
    assert "base/model.safetensors" in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
