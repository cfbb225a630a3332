"""One pass over the bytes: with `check_first` off the merge reads each input byte once,
hashes and checks it there, and the scores and the different-base check ride along the merge pass.
Same output and record as the pre-flight way; the same refusals, still before anything is published."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_checks import expect_error
from models import finetune, load, write_model
from safetensors.torch import save_file

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import CheckpointError, LineageError
from nufilt_core.lineage import LineageRecord
from nufilt_core.merge import MergeRequest, ScoreRequest, merge_step
from nufilt_core.methods.base import StepContext
from nufilt_core.methods.nufilt import Nufilt, NufiltSettings
from nufilt_core.plausibility import DistanceObserver, distance_from_base
from nufilt_core.scores import ScoreObserver, record_scope, surrogate_scores

WIDE = 192  # matrices big enough that the weights, not headers and records, are what a merge reads


def wide_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"embeddings.word_embeddings.weight": torch.randn(400, WIDE, generator=g),
             "embeddings.LayerNorm.weight": torch.ones(WIDE)}
    for i in range(2):
        for m in ("attention.self.query", "attention.self.value", "intermediate.dense"):
            state[f"encoder.layer.{i}.{m}.weight"] = torch.randn(WIDE, WIDE, generator=g) / 8
            state[f"encoder.layer.{i}.{m}.bias"] = torch.randn(WIDE, generator=g) / 10
    state["embeddings.position_ids"] = torch.arange(16, dtype=torch.int64).unsqueeze(0)
    return state


@pytest.fixture
def wide(tmp_path: Path) -> dict[str, Path]:
    base = wide_state()
    paths = {"base": write_model(base, tmp_path / "base")}
    for i in (1, 2):  # t2 sharded: its storage order differs from the base's, its hash must not
        paths[f"t{i}"] = write_model(finetune(base, i, scale=0.005), tmp_path / f"t{i}", shards=i)
    return paths


def two_steps(wide: dict[str, Path], out: Path, check_first: bool, **first: object) -> list:
    results, previous = [], None
    for t in (1, 2):
        req = MergeRequest(base=wide["base"], checkpoint=wide[f"t{t}"], output=out / f"m{t}", previous=previous,
                           check_first=check_first, **(first if t == 1 else {}))  # type: ignore[arg-type]
        results.append(merge_step(req))
        previous = out / f"m{t}"
    return results


@pytest.mark.parametrize("options", [{"iters": 3}, {"iters": 3, "policy": "keep_previous"}])
def test_one_pass_writes_what_the_pre_flight_way_writes(wide, tmp_path, options):
    """Bit for bit, with the same content hashes in the lineage record (keep_previous: tensors copied as
    stored, whose other inputs only the end of the pass reads)."""
    before = two_steps(wide, tmp_path / "first", True, options=options)
    after = two_steps(wide, tmp_path / "once", False, options=options)
    for a, b in zip(before, after, strict=True):
        assert a.record.model_sha256 == b.record.model_sha256
        assert a.record.base == b.record.base and a.record.checkpoints == b.record.checkpoints
        assert (a.output / "model.safetensors").read_bytes() == (b.output / "model.safetensors").read_bytes()


def rchar() -> int:
    """Bytes this process (all its threads) passed through read system calls: the page cache counts."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def weight_bytes(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders for f in folder.glob("*.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_one_pass_reads_each_input_byte_once(wide, tmp_path):
    m1 = tmp_path / "m1"  # also imports what the measured merges use (a first import reads .py files)
    merge_step(MergeRequest(base=wide["base"], checkpoint=wide["t1"], output=m1, options={"iters": 3},
                            check_first=False, scores=ScoreRequest(), observers=[DistanceObserver(wide["t1"])]))
    inputs = weight_bytes(wide["base"], m1, wide["t2"])
    read = {}
    for check_first in (True, False):
        out = tmp_path / f"m2-{check_first}"
        start = rchar()
        merge_step(MergeRequest(base=wide["base"], previous=m1, checkpoint=wide["t2"], output=out,
                                check_first=check_first, scores=None if check_first else ScoreRequest(),
                                observers=[] if check_first else [DistanceObserver(wide["t2"])]))
        read[check_first] = rchar() - start
    assert read[True] > 1.75 * inputs  # a pre-flight pass, then the merge pass
    assert inputs <= read[False] < 1.05 * inputs  # everything read, once, scores and distances included


@pytest.mark.parametrize("check_first", [True, False])
def test_non_finite_input_is_refused_naming_file_and_tensor(tmp_path, check_first):
    base = wide_state()
    b = write_model(base, tmp_path / "base")
    for name in ("encoder.layer.1.attention.self.value.weight", "embeddings.LayerNorm.weight"):
        bad = finetune(base, 1)
        bad[name].view(-1)[5] = float("nan")
        folder = write_model(bad, tmp_path / "nan")
        # keep_previous at step 1 copies the LayerNorm from the checkpoint as stored
        expect_error(tmp_path, MergeRequest(base=b, checkpoint=folder, output=tmp_path / "out",
                                            options={"policy": "keep_previous"}, check_first=check_first),
                     CheckpointError, name, "NaN", "nan/model.safetensors")


def test_one_pass_lineage_checks_still_refuse_before_publishing(wide, tmp_path):
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=wide["base"], checkpoint=wide["t1"], output=m1, check_first=False))
    out = tmp_path / "out"
    expect_error(tmp_path, MergeRequest(base=wide["base"], checkpoint=wide["t1"], output=out, previous=m1,
                                        check_first=False), LineageError, "already merged at step 1")
    other = write_model(wide_state(seed=5), tmp_path / "other-base")
    expect_error(tmp_path, MergeRequest(base=other, checkpoint=wide["t2"], output=out, previous=m1,
                                        check_first=False), LineageError, "another base")
    tampered = load(m1)
    tampered["embeddings.LayerNorm.weight"] += 1  # changed after merging: found by the hash of what the pass read
    save_file(tampered, str(m1 / "model.safetensors"))
    expect_error(tmp_path, MergeRequest(base=wide["base"], checkpoint=wide["t2"], output=out, previous=m1,
                                        check_first=False), LineageError, "no longer match")


@pytest.mark.parametrize("ranks", [ScoreRequest(), ScoreRequest(null_rank=4, task_rank=2)])
def test_scores_from_the_merge_pass_match_the_scores_from_the_files(wide, tmp_path, ranks):
    """Default ranks reuse the merge's own V̂; other ranks are computed in the pass: both as from disk."""
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=wide["base"], checkpoint=wide["t1"], output=m1, options={"iters": 3}))
    m2 = tmp_path / "m2"
    res = merge_step(MergeRequest(base=wide["base"], previous=m1, checkpoint=wide["t2"], output=m2,
                                  check_first=False, scores=ranks))
    selected, null_rank, task_rank = record_scope(LineageRecord.read(m2), list(Checkpoint.open(m2).tensors))
    null_rank, task_rank = ranks.null_rank or null_rank, ranks.task_rank or task_rank
    opened = [Checkpoint.open(p) for p in (wide["base"], m1, wide["t2"], m2)]
    on_disk = surrogate_scores(*opened, selected, null_rank, task_rank)
    assert res.scores is not None and res.scores.matrices == on_disk.matrices == 6
    assert (res.scores.null_rank, res.scores.task_rank) == (null_rank, task_rank)
    for key in ("stability_raw", "plasticity_raw", "stability_ref", "plasticity_ref"):
        assert getattr(res.scores, key) == pytest.approx(getattr(on_disk, key), rel=1e-5), key
    assert 0 < res.scores.stability < 1 and 0 < res.scores.plasticity < 1


def test_nufilt_hands_its_subspaces_to_the_scores():
    """What the merge computed for a matrix is what the score observer uses when told to reuse it."""
    g = torch.Generator().manual_seed(3)
    base, prev, new = (torch.randn(24, 16, generator=g) for _ in range(3))
    prev, new = base + prev / 10, base + new / 10
    settings = NufiltSettings(profile="paper", null_rank=4, task_rank=2, iters=2)
    method = Nufilt(settings, StepContext(step=2, seed=0, device=torch.device("cpu"), names=["a.weight"]))
    merged = method.merge("a.weight", base, prev, new)
    v_prev, v_new = method.subspaces("a.weight")
    assert v_prev.shape == (16, 4) and v_new.shape == (16, 2) and method.subspaces("other.weight") is None
    computed, reused, fake = (ScoreObserver(lambda n, s: True, 4, 2, reuse=r) for r in (False, True, True))
    computed.observe("a.weight", base, prev, new, merged, None)
    reused.observe("a.weight", base, prev, new, merged, (v_prev, v_new))
    fake.observe("a.weight", base, prev, new, merged, (v_prev[:, :1], v_new[:, :1]))
    assert reused.scores().stability_raw == pytest.approx(computed.scores().stability_raw, rel=1e-5)
    assert fake.scores().stability_ref < 0.99 * computed.scores().stability_ref  # the given V̂ are used
    published = Nufilt(NufiltSettings(profile="paper", first_step="published_code"),
                       StepContext(step=2, seed=0, device=torch.device("cpu"), names=["a.weight"]))
    published.merge("a.weight", base, prev, new)
    assert published.subspaces("a.weight") is None  # the published code's rule: not offered to the scores


def test_distance_observer_refuses_another_base_before_publishing(wide, tmp_path):
    unrelated = write_model(wide_state(seed=7), tmp_path / "unrelated")
    expect_error(tmp_path, MergeRequest(base=wide["base"], checkpoint=unrelated, output=tmp_path / "out",
                                        check_first=False, observers=[DistanceObserver(unrelated)]),
                 CheckpointError, "implausibly far", "unrelated")
    genuine = DistanceObserver(wide["t1"])
    merge_step(MergeRequest(base=wide["base"], checkpoint=wide["t1"], output=tmp_path / "m1", check_first=False,
                            observers=[genuine]))
    assert genuine.distance() == distance_from_base(Checkpoint.open(wide["base"]), Checkpoint.open(wide["t1"]))
    assert genuine.distance().tensors == 7  # the six matrices and the embeddings, copied at step 1 yet seen
