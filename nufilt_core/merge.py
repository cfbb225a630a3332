"""One continual merge step: (base θ0, previous merged model, new checkpoint) → new merged model.

Streaming: tensors are read, merged and written one at a time, so memory holds about one
layer, not three models. Order of work:
  1. `_resolve`: open the three inputs (headers only), read the previous lineage record, resolve
     method, settings, seed and step;
  2. `_preflight`: names, shapes and dtypes against the base, then one streaming pass that hashes
     every tensor and checks it is finite, and the lineage checks on those hashes;
  3. `_statistics`: the method's statistics passes, if it has any;
  4. `_write`: the merge pass into a hidden temporary sibling of the output, which is renamed into place
     only when complete (weights, side files, lineage record, all fsynced).
"""

from __future__ import annotations

import os
import resource
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import Checkpoint, all_finite
from .devices import resolve_device
from .errors import CheckpointError, LineageError, NufiltError, SettingsError
from .fsutil import fsync_dir
from .lineage import CheckpointRef, LineageRecord
from .methods import MergeMethod, StepContext, get_method, resolve_settings
from .methods.base import UntouchedRule
from .readahead import read_ahead
from .safetensors_io import StreamingWriter

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DEFAULT_METHOD = "nufilt"


@dataclass
class Progress:
    phase: str  # "check", "statistics", "merge"
    index: int  # 1-based
    total: int
    name: str  # tensor name, or the input being checked
    elapsed: float  # seconds since the step started


ProgressFn = Callable[[Progress], None]


@dataclass
class MergeRequest:
    base: Path
    checkpoint: Path
    output: Path
    previous: Path | None = None  # None: this is step 1
    method: str | None = None  # None: the previous record's method, else nufilt
    options: dict[str, Any] = field(default_factory=dict)  # explicit settings; the rest are inherited
    seed: int | None = None  # None: the previous record's seed, else 0
    device: str = "auto"
    max_shard_bytes: int | None = None  # None: follow the base's sharding (output_shard_bytes)
    overwrite: bool = False
    reserved_names: tuple[str, ...] = ()  # side files never copied: the caller writes its own (the daemon's report)


@dataclass
class MergeResult:
    output: Path
    record: LineageRecord
    seconds: dict[str, float]  # per phase


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def output_shard_bytes(requested: int | None, base: Checkpoint) -> int:
    """The output's max shard size: the one asked for, else the base's largest shard when the base is
    sharded, else DEFAULT_MAX_SHARD_BYTES. The writer cuts greedily in the base's tensor order, so a base
    cut the same way (as `save_pretrained` does) gets back the same files with the same tensors in each."""
    if requested is not None:
        return requested
    return base.largest_shard_bytes() or DEFAULT_MAX_SHARD_BYTES


def scan_and_hash(ckpt: Checkpoint, role: str, report: Callable[[str], None]) -> str:
    """Hash every tensor and check floats are finite, in one streaming pass."""
    sha, non_finite = ckpt.hash_and_non_finite(report)
    if non_finite:
        first = non_finite[0]
        raise CheckpointError(first.file, f"{role} holds NaN/Inf values ({len(non_finite)} tensor(s) "
                              "affected, this is the first)", tensor=first.name)
    return sha


@dataclass
class _Step:
    """Part 1's result: the opened inputs and everything resolved about this step."""

    req: MergeRequest
    base: Checkpoint
    new: Checkpoint
    previous: Checkpoint | None
    prev_record: LineageRecord | None
    method_name: str
    method_cls: type[MergeMethod]
    settings: Any  # the method's Settings
    seed: int
    step: int
    device: torch.device
    untouched: UntouchedRule  # the method's: which input a float tensor is left as, bit for bit

    @property
    def inputs(self) -> list[Checkpoint]:
        return [c for c in (self.base, self.previous, self.new) if c is not None]  # θ_0^m = θ0: read once at step 1

    def copied_from(self, name: str) -> Checkpoint | None:
        """The input a tensor is copied from as stored, when it is one the method leaves bit for bit as an
        input (`MergeMethod.untouched`) or an integer buffer (the base's): such a tensor is never decoded
        to fp32, so e.g. a Llama's embeddings and lm_head cost one stored copy, not three fp32 ones."""
        info = self.base.tensors[name]
        if not info.is_float:
            return self.base
        source = self.untouched(name, info.shape)
        return None if source is None else {"base": self.base, "previous": self.previous or self.base,
                                            "new": self.new}[source]

    def _sources(self, name: str, writing: bool) -> list[Checkpoint]:
        """The inputs a pass reads a tensor from: the statistics passes see every input of a float tensor,
        the merge pass only the one a copied tensor comes from."""
        if not self.base.tensors[name].is_float:
            return [self.base]
        copied = self.copied_from(name) if writing else None
        return self.inputs if copied is None else [copied]

    def stored(self, name: str, writing: bool = False) -> list[torch.Tensor]:
        """One tensor as stored in each input it is taken from, on the CPU (what the read-ahead thread reads)."""
        return [c.read(name) for c in self._sources(name, writing)]

    def stored_bytes(self, name: str, writing: bool = False) -> int:
        return sum(c.tensors[name].nbytes for c in self._sources(name, writing))

    def load(self, name: str, stored: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
        """(base, previous, new) of one float tensor on the device, in fp32 (fp64 stays fp64), from what was
        read ahead, else read now, one input at a time (a big tensor never has three stored copies at once)."""
        compute = torch.float64 if self.base.tensors[name].torch_dtype == torch.float64 else torch.float32
        if stored is None:
            got = [c.read(name).to(device=self.device, dtype=compute) for c in self.inputs]
        else:
            got = [t.to(device=self.device, dtype=compute) for t in stored]
        return (got[0], got[1], got[2]) if self.previous else (got[0], got[0], got[1])


def _resolve(req: MergeRequest) -> _Step:
    """Part 1: open the inputs (headers only), read the lineage, resolve method, settings, seed and step."""
    if Path(req.output).exists() and not req.overwrite:
        raise NufiltError(f"{req.output}: already exists (pass --overwrite to replace it)")
    device = resolve_device(req.device)
    base, new = Checkpoint.open(req.base), Checkpoint.open(req.checkpoint)
    previous = Checkpoint.open(req.previous) if req.previous else None
    prev_record = LineageRecord.read(Path(req.previous)) if req.previous else None
    method_name = req.method or (prev_record.method if prev_record else DEFAULT_METHOD)
    method_cls = get_method(method_name)
    if prev_record and prev_record.method != method_name:
        raise LineageError(f"{req.previous} was merged with method '{prev_record.method}'; a continual "
                           f"run cannot switch to '{method_name}' (start again from step 1)")
    settings = resolve_settings(method_cls, prev_record.settings if prev_record else {}, req.options)
    seed = req.seed if req.seed is not None else (prev_record.seed if prev_record else 0)
    step = prev_record.step + 1 if prev_record else 1
    untouched = method_cls.untouched(settings, step, list(base.tensors))
    return _Step(req, base, new, previous, prev_record, method_name, method_cls, settings, seed, step, device,
                 untouched)


def _preflight(s: _Step, report: Callable[[str, int, int, str], None]) -> dict[str, str]:
    """Part 2: everything that can fail does so before any heavy work. Layouts, then one streaming
    pass per input that hashes every tensor and checks it is finite, then the lineage checks."""
    s.base.check_same_layout(s.new, "checkpoint")
    if s.previous:
        s.base.check_same_layout(s.previous, "previous merged model")
    inputs = [("base", s.base), ("checkpoint", s.new)] + ([("previous", s.previous)] if s.previous else [])
    total = sum(len(c.tensors) for _, c in inputs)
    done = 0
    hashes: dict[str, str] = {}
    for role, ckpt in inputs:
        def tick(name: str, role: str = role) -> None:
            nonlocal done
            done += 1
            report("check", done, total, f"{role}: {name}")
        hashes[role] = scan_and_hash(ckpt, role, tick)
    if s.prev_record:
        req, rec = s.req, s.prev_record
        if rec.base.sha256 != hashes["base"]:
            raise LineageError(f"{req.previous} descends from another base (sha256 {rec.base.sha256[:12]}…), "
                               f"not {req.base} ({hashes['base'][:12]}…)")
        if rec.model_sha256 != hashes["previous"]:
            raise LineageError(f"{req.previous}: weights no longer match their lineage record "
                               "(modified or corrupted after merging)")
        for t, ref in enumerate(rec.checkpoints, 1):
            if ref.sha256 == hashes["checkpoint"]:
                raise LineageError(f"{req.checkpoint} was already merged at step {t} of {req.previous}")
    return hashes


def _statistics(s: _Step, method: MergeMethod, report: Callable[[str, int, int, str], None]) -> None:
    """Part 3: the method's statistics passes over the float tensors, if it has any."""
    float_names = [n for n, i in s.base.tensors.items() if i.is_float]
    with torch.no_grad():
        for p in range(method.passes):
            for i, (name, stored) in enumerate(read_ahead(float_names, s.stored, s.stored_bytes), 1):
                method.observe(p, name, *s.load(name, stored))
                report("statistics", i, len(float_names), name)
            method.end_pass(p)


def _write(s: _Step, method: MergeMethod, hashes: dict[str, str], report: Callable[[str, int, int, str], None],
           started: float) -> LineageRecord:
    """Part 4: the merge pass into a hidden temporary sibling of the output (weights, side files, lineage
    record, all fsynced), renamed into place only when complete; removed on any failure."""
    req, output = s.req, Path(s.req.output)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        plan = [(n, i.dtype, i.shape) for n, i in s.base.tensors.items()]
        writer = StreamingWriter(tmp, plan, output_shard_bytes(req.max_shard_bytes, s.base))
        with torch.no_grad():
            for i, (name, stored) in enumerate(read_ahead(list(s.base.tensors), partial(s.stored, writing=True),
                                                          partial(s.stored_bytes, writing=True)), 1):
                info = s.base.tensors[name]
                copied = s.copied_from(name)
                if copied is not None:  # as stored in that input (scanned finite by the pre-flight)
                    out = stored[0] if stored else copied.read(name)
                else:
                    loaded = s.load(name, stored)
                    stored = None  # narrow stored copies are not needed once converted
                    merged = method.merge(name, *loaded)
                    if not all_finite(merged):
                        raise NufiltError(f"method {s.method_name} produced NaN/Inf for tensor '{name}'")
                    out = merged.to(device="cpu", dtype=info.torch_dtype)
                writer.write(name, out)
                report("merge", i, len(plan), name)
        model_sha = writer.close()
        for side in s.new.side_files(req.reserved_names):
            shutil.copy2(side, tmp / side.name)
        record = LineageRecord(
            method=s.method_name, settings=s.settings.model_dump(mode="json"), seed=s.seed, step=s.step,
            base=CheckpointRef(hashes["base"], str(req.base)),
            checkpoints=[*(s.prev_record.checkpoints if s.prev_record else []),
                         CheckpointRef(hashes["checkpoint"], str(req.checkpoint))],
            model_sha256=model_sha, method_state=method.state(), summary=method.summary(),
            tool=f"nufilt {__version__}", created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            device=str(s.device), duration_seconds=round(time.perf_counter() - started, 3),
            peak_rss_bytes=peak_rss_bytes())
        record.write(tmp)
        fsync_dir(tmp)
        if output.exists():  # --overwrite: move the old one aside first, so a crash keeps one of them
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def merge_step(req: MergeRequest, progress: ProgressFn | None = None) -> MergeResult:
    """One step, in the four parts the module docstring lists; seconds per phase in the result."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def report(phase: str, index: int, total: int, name: str) -> None:
        if progress:
            progress(Progress(phase, index, total, name, time.perf_counter() - t0))

    s = _resolve(req)
    hashes = _preflight(s, report)
    seconds["check"] = time.perf_counter() - t0
    method = s.method_cls(s.settings, StepContext(step=s.step, seed=s.seed, device=s.device,
                                                  names=list(s.base.tensors),
                                                  previous_state=s.prev_record.method_state if s.prev_record else {}))
    t = time.perf_counter()
    _statistics(s, method, report)
    seconds["statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    record = _write(s, method, hashes, report, t0)
    seconds["merge"] = time.perf_counter() - t
    return MergeResult(Path(req.output), record, seconds)


def continual_merge(base: Path, checkpoints: Sequence[Path], output: Path, *, method: str = DEFAULT_METHOD,
                    options: dict[str, Any] | None = None, seed: int = 0, device: str = "auto",
                    progress: ProgressFn | None = None) -> MergeResult:
    """Merge several checkpoints in order; intermediate models live in a temporary folder."""
    if not checkpoints:
        raise SettingsError("continual_merge needs at least one checkpoint")
    work = output.parent / f".{output.name}.steps-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        previous: Path | None = None
        result = None
        for t, ckpt in enumerate(checkpoints, 1):
            target = output if t == len(checkpoints) else work / f"step-{t}"
            req = MergeRequest(base=base, checkpoint=ckpt, output=target, previous=previous,
                               method=method if t == 1 else None, options=(options or {}) if t == 1 else {},
                               seed=seed, device=device)
            result = merge_step(req, progress)
            previous = target
        assert result is not None
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
