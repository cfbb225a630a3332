"""One continual merge step: (base θ0, previous merged model, new checkpoint) → new merged model.

Streaming: tensors are read, merged and written one at a time, so memory holds about one
layer, not three models. Order of work:
  1. `_resolve`: open the three inputs (headers only), read the previous lineage record, resolve
     method, settings, seed and step;
  2. `_preflight`: names, shapes and dtypes against the base, then one streaming pass that hashes
     every tensor and checks it is finite, and the lineage checks on those hashes (`check_first`);
  3. `_statistics`: the method's statistics passes, if it has any;
  4. `_write`: the merge pass into a hidden temporary sibling of the output, which is renamed into place
     only when complete (weights, side files, lineage record, all fsynced).
With `check_first` off (the daemon), part 2 checks only the layouts and part 4's merge pass hashes and
checks every input tensor as it reads it, reads once what no pass needed, and runs the lineage checks
and the observers' verdicts before publishing: each input byte is read once.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import interrupts
from ._version import __version__
from .checkpoint import Checkpoint, all_finite
from .devices import CPU, cpu_workers, resolve_device, torch_threads
from .errors import CheckpointError, LineageError, NufiltError, SettingsError
from .fsutil import fsync_dir
from .linalg import one_blas_thread
from .lineage import CheckpointRef, LineageRecord
from .matrix_pool import EXECUTORS, Executor, MatrixPool, matrix_pool
from .methods import MergeMethod, StepContext, get_method, resolve_settings
from .methods.base import LowRank, Source, UntouchedRule, source_input
from .observers import TensorObserver
from .peak_memory import peak_rss_bytes
from .ray_executor import check_ray
from .readahead import read_ahead
from .safetensors_io import (
    StreamingWriter,
    TensorInfo,
    read_raw,
    read_tensor,
    tensor_bytes,
    tensor_digest,
    tensor_from_raw,
)
from .scores import ScoreObserver, SurrogateScores, method_scope

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


@dataclass(frozen=True)
class ScoreRequest:
    """Surrogate scores computed in the merge pass; a rank None is the method's (MergeMethod.scored)."""

    null_rank: int | None = None
    task_rank: int | None = None


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
    # True: a pre-flight pass hashes and scans every input before any merging (fails early: the CLI's way).
    # False: one pass over the bytes (the daemon's way): each input byte is read once, by the merge pass,
    # and hashed and checked there; the lineage checks and observers run after it, before publishing.
    check_first: bool = True
    observers: Sequence[TensorObserver] = ()  # work that rides along the merge pass (observers.py)
    scores: ScoreRequest | None = None  # the surrogate scores (scores.py), computed in the merge pass
    # on the CPU, matrices a parallel-safe method (NUFILT) merges at once, one torch and BLAS thread each; the
    # output's bytes do not depend on it. None: the cores this process may use. Other methods and CUDA: one
    workers: int | None = None
    # where those matrices are merged: this process's threads (local), or Ray tasks (ray_executor.py) on the
    # cluster at ray_address (None: RAY_ADDRESS, else a Ray instance started on this host); same bytes on CPUs.
    # With ray, `device` is the tasks': cpu (auto) or cuda (a GPU per task)
    executor: Executor = "local"
    ray_address: str | None = None


@dataclass
class MergeResult:
    output: Path
    record: LineageRecord
    seconds: dict[str, float]  # per phase
    scores: SurrogateScores | None = None  # when the request asked for them
    digests: StepDigests | None = None  # in one pass: what was read and written, tensor by tensor


@dataclass
class StepDigests:
    """Content-hash lines (safetensors_io.tensor_digest) of every tensor one pass read and wrote: enough to
    compare a written tensor with an input's without reading either again."""

    inputs: dict[str, dict[str, str]]  # role ("base", "previous", "checkpoint") → name → line
    output: dict[str, str]  # name → line


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


Input = tuple[str, Checkpoint]  # (role, checkpoint): role "base", "previous" or "checkpoint", as in messages


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
    observers: list[TensorObserver]  # the caller's, and the scores' when asked for
    scores: ScoreObserver | None
    # one pass (check_first False): every input tensor's content-hash line, filled as the passes read it
    digests: dict[str, dict[str, str]] | None = None
    watchers: dict[str, list[TensorObserver]] = field(default_factory=dict)  # float tensor → observers wanting it
    workers: int = 1  # tensors merged at once (MergeRequest.workers, for a parallel-safe method on the CPU)
    ray_device: torch.device = CPU  # where the ray executor's tasks merge

    def __post_init__(self) -> None:
        if not self.req.check_first:
            self.digests = {role: {} for role, _ in self.roles}
        for name, info in self.base.tensors.items():
            wanting = [o for o in self.observers if info.is_float and o.wants(name, info.shape)]
            if wanting:
                self.watchers[name] = wanting

    @property
    def roles(self) -> list[Input]:
        inputs = [("base", self.base), ("previous", self.previous), ("checkpoint", self.new)]
        return [(r, c) for r, c in inputs if c is not None]  # θ_0^m = θ0: read once at step 1

    def read(self, source: Input, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor of an input, on the CPU: as stored, or for an adapter θ0's value changed by it (fp32, fp64
        for an fp64 base) from its factors and `base` (θ0's value as stored, read here when not given)."""
        role, ckpt = source
        if ckpt.adapter is None:
            return self._read_stored(role, ckpt.tensors[name])
        if base is None:
            base = self.read(("base", self.base), name)
        compute = torch.float64 if base.dtype == torch.float64 else torch.float32
        out = ckpt.adapter.materialise(name, base.to(compute), partial(self._read_stored, role))
        if self.digests is not None:  # what the gate's untouched check compares a copied tensor with
            info = self.base.tensors[name]
            self.digests[role][name] = tensor_digest(name, info.dtype, info.shape,
                                                     tensor_bytes(out.to(info.torch_dtype)))
        return out

    def factors(self, name: str) -> LowRank | None:
        """The new checkpoint's task vector of tensor `name` as factors (left @ right) on the device in the compute
        dtype, when it is an adapter's plain LoRA update (its factors are small: read again here)."""
        adapter, info = self.new.adapter, self.base.tensors[name]
        if adapter is None or len(info.shape) != 2:
            return None
        compute = torch.float64 if info.torch_dtype == torch.float64 else torch.float32
        return adapter.factors(name, info.shape, partial(self._read_stored, "checkpoint"), compute, self.device)

    def _read_stored(self, role: str, info: TensorInfo) -> torch.Tensor:
        """One stored tensor. In one pass also hashed and, when float, checked finite: each input byte is read
        once, so this is where that input is verified."""
        if self.digests is None:
            return read_tensor(info)
        raw = read_raw(info)
        self.digests[role][info.name] = tensor_digest(info.name, info.dtype, info.shape, raw)
        tensor = tensor_from_raw(info, raw)
        if info.is_float and not all_finite(tensor):
            raise CheckpointError(info.file, f"{role} holds NaN/Inf values", tensor=info.name)
        return tensor

    def copied_from(self, name: str) -> Source | None:
        """The input a tensor is written from as stored: one the method leaves bit for bit as an input
        (`MergeMethod.untouched`) or an integer buffer (the base's). Such a tensor is never decoded to fp32,
        so e.g. a Llama's embeddings and lm_head cost one stored copy, not three fp32 ones — unless an
        observer wants to see it."""
        info = self.base.tensors[name]
        if not info.is_float:
            return "base"
        return None if name in self.watchers else self.untouched(name, info.shape)

    def _sources(self, name: str, writing: bool) -> list[Input]:
        """The inputs a pass reads a tensor from: the statistics passes see every input of a float tensor,
        the merge pass only the one a copied tensor comes from."""
        copied = self.copied_from(name) if writing or not self.base.tensors[name].is_float else None
        if copied is None:
            return self.roles
        return [source_input(copied, ("base", self.base), ("previous", self.previous) if self.previous else None,
                             ("checkpoint", self.new))]

    def stored(self, name: str, writing: bool = False) -> list[torch.Tensor]:
        """One tensor as stored in each input it is taken from, on the CPU (what the read-ahead thread reads);
        an adapter's made from the base's, read first."""
        out: list[torch.Tensor] = []
        base = None
        for source in self._sources(name, writing):
            out.append(self.read(source, name, base))
            if source[0] == "base":
                base = out[-1]
        return out

    def stored_bytes(self, name: str, writing: bool = False) -> int:
        info = self.base.tensors[name]
        return sum(info.numel * 4 + c.adapter.factor_bytes(name) if c.adapter else c.tensors[name].nbytes
                   for _, c in self._sources(name, writing))

    def load(self, name: str, stored: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
        """(base, previous, new) of one float tensor on the device, in fp32 (fp64 stays fp64), from what was
        read ahead, else read now, one input at a time (a big tensor never has three stored copies at once)."""
        compute = torch.float64 if self.base.tensors[name].torch_dtype == torch.float64 else torch.float32
        if stored is None:
            got: list[torch.Tensor] = []
            for source in self.roles:  # the base first: an adapter's value is made from it
                got.append(self.read(source, name, got[0] if got else None).to(device=self.device, dtype=compute))
        else:
            got = [t.to(device=self.device, dtype=compute) for t in stored]
        return (got[0], got[1], got[2]) if self.previous else (got[0], got[0], got[1])

    def read_the_rest(self, report: Callable[[str, int, int, str], None]) -> dict[str, str]:
        """One pass, after the merge pass: the input tensors no pass needed (the other inputs of a copied
        tensor), read once for their hashes; then every input's content hash."""
        assert self.digests is not None
        rest = [(role, info) for role, c in self.roles for name, info in c.tensors.items()
                if name not in self.digests[role]]
        for i, (role, info) in enumerate(rest, 1):
            self._read_stored(role, info)
            report("check", i, len(rest), f"{role}: {info.name}")
        return {role: c.content_hash(self.digests[role][n] for n in c.tensors) for role, c in self.roles}


def _score_observer(req: MergeRequest, method_cls: type[MergeMethod], settings: Any,
                    names: list[str]) -> ScoreObserver | None:
    """The scores' observer when asked for; it reuses the method's own V̂ when they are at the same ranks."""
    if req.scores is None:
        return None
    selected, null_rank, task_rank = method_scope(method_cls, settings, names)
    null_rank, task_rank = req.scores.null_rank or null_rank, req.scores.task_rank or task_rank
    own = method_cls.scored(settings, names)
    return ScoreObserver(selected, null_rank, task_rank, reuse=own is not None and own[1:] == (null_rank, task_rank))


def _resolve(req: MergeRequest) -> _Step:
    """Part 1: open the inputs (headers only), read the lineage, resolve method, settings, seed and step."""
    if Path(req.output).exists() and not req.overwrite:
        raise NufiltError(f"{req.output}: already exists (pass --overwrite to replace it)")
    if req.executor not in EXECUTORS:
        raise SettingsError(f"executor {req.executor!r}: use one of {', '.join(EXECUTORS)}")
    device, ray_device = _devices(req)
    base, new = Checkpoint.open(req.base), Checkpoint.open(req.checkpoint)
    previous = Checkpoint.open(req.previous) if req.previous else None
    for role, opened in (("the base", base), ("--previous", previous)):
        if opened is not None and opened.adapter is not None:
            raise CheckpointError(opened.path, f"is a PEFT adapter; {role} must be a full model (adapters arrive as "
                                  "checkpoints)")
    prev_record = LineageRecord.read(Path(req.previous)) if req.previous else None
    method_name = req.method or (prev_record.method if prev_record else DEFAULT_METHOD)
    method_cls = get_method(method_name)
    if prev_record and prev_record.method != method_name:
        raise LineageError(f"{req.previous} was merged with method '{prev_record.method}'; a continual "
                           f"run cannot switch to '{method_name}' (start again from step 1)", culprit="settings")
    if req.executor == "ray" and not method_cls.parallel_safe:
        raise SettingsError(f"the ray executor merges with a parallel-safe method (nufilt); {method_name} runs on "
                            "the local executor")
    if req.executor == "ray":
        check_ray(req.ray_address)  # the cluster, before any heavy work
    settings = resolve_settings(method_cls, prev_record.settings if prev_record else {}, req.options)
    seed = req.seed if req.seed is not None else (prev_record.seed if prev_record else 0)
    step = prev_record.step + 1 if prev_record else 1
    names = list(base.tensors)
    untouched = method_cls.untouched(settings, step, names)
    scores = _score_observer(req, method_cls, settings, names)
    observers = [*req.observers, *([scores] if scores else [])]
    return _Step(req, base, new, previous, prev_record, method_name, method_cls, settings, seed, step, device,
                 untouched, observers, scores, ray_device=ray_device)


def _devices(req: MergeRequest) -> tuple[torch.device, torch.device]:
    """(this process's device, the Ray tasks' device). With the ray executor this process only reads, checks and
    writes, on its CPU, and `cuda` asks the cluster for a GPU per task (the cluster assigns them: no index)."""
    if req.executor != "ray":
        return resolve_device(req.device), CPU
    if req.device not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"--device {req.device}: with the ray executor use cpu or cuda (a GPU per task, "
                            "assigned by the cluster); auto means cpu there")
    return CPU, torch.device("cuda") if req.device == "cuda" else CPU


def _preflight(s: _Step, report: Callable[[str, int, int, str], None]) -> dict[str, str] | None:
    """Part 2: everything that can fail does so before any heavy work. Layouts, then (check_first) one
    streaming pass per input that hashes every tensor and checks it is finite, then the lineage checks.
    None in one pass: the merge pass hashes and checks what it reads."""
    s.base.check_same_layout(s.new, "checkpoint")
    if s.previous:
        s.base.check_same_layout(s.previous, "previous merged model")
    if not s.req.check_first:
        return None
    inputs = [("base", s.base), ("checkpoint", s.new)] + ([("previous", s.previous)] if s.previous else [])
    total = sum(len(c.tensors) for _, c in inputs)
    done = itertools.count(1)  # next() on it is atomic: the inputs are checked side by side
    abandoned = threading.Event()

    def check(role: str, ckpt: Checkpoint) -> str:
        def tick(name: str) -> None:
            if abandoned.is_set():
                raise _Abandoned
            report("check", next(done), total, f"{role}: {name}")
        return scan_and_hash(ckpt, role, tick)

    # one input per core: hashing (sha256) bounds this pass, and hashlib and reading release the GIL
    with ThreadPoolExecutor(min(len(inputs), cpu_workers(s.req.workers)), thread_name_prefix="nufilt-check") as pool:
        futures = [pool.submit(check, role, ckpt) for role, ckpt in inputs]
        try:
            hashes = {role: f.result() for (role, _), f in zip(inputs, futures, strict=True)}  # errors in input order
        except BaseException:
            abandoned.set()  # the other inputs' passes stop at their next tensor
            raise
    _check_lineage(s, hashes)
    return hashes


class _Abandoned(Exception):
    """An input's check pass stops: another input's failed."""


def _check_lineage(s: _Step, hashes: dict[str, str]) -> None:
    """The inputs' hashes against the previous model's lineage record."""
    if not s.prev_record:
        return
    req, rec = s.req, s.prev_record
    if rec.base.sha256 != hashes["base"]:
        raise LineageError(f"{req.previous} descends from another base (sha256 {rec.base.sha256[:12]}…), "
                           f"not {req.base} ({hashes['base'][:12]}…)", culprit="base")
    if rec.model_sha256 != hashes["previous"]:
        raise LineageError(f"{req.previous}: weights no longer match their lineage record "
                           "(modified or corrupted after merging)")
    for t, ref in enumerate(rec.checkpoints, 1):
        if ref.sha256 == hashes["checkpoint"]:
            raise LineageError(f"{req.checkpoint} was already merged at step {t} of {req.previous}",
                               culprit="checkpoint")


def _statistics(s: _Step, method: MergeMethod, report: Callable[[str, int, int, str], None]) -> None:
    """Part 3: the method's statistics passes over the float tensors, if it has any."""
    float_names = [n for n, i in s.base.tensors.items() if i.is_float]
    with torch.no_grad():
        for p in range(method.passes):
            for i, (name, stored) in enumerate(read_ahead(float_names, s.stored, s.stored_bytes), 1):
                method.observe(p, name, *s.load(name, stored))
                report("statistics", i, len(float_names), name)
            method.end_pass(p)


SOURCE_POSITION = {"base": 0, "previous": 1, "new": 2}  # in _Step.load's (base, previous, new)


def _done(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value


def _begin(s: _Step, method: MergeMethod, name: str, stored: list[torch.Tensor] | None,
           pool: MatrixPool | None) -> Callable[[], torch.Tensor]:
    """Start one tensor of the output: its merge runs on `pool` when there is one. Returns the call that
    finishes it, in the caller's thread and in the base's order: the tensor as it is written, the observers
    that want it having seen it."""
    info = s.base.tensors[name]
    copied = s.copied_from(name)
    if copied is not None:  # as stored in that input (scanned finite by the pre-flight, or as it was read);
        # an adapter's value is made in fp32 and stored in the base's dtype
        out = (stored[0] if stored else s.stored(name, writing=True)[0]).to(info.torch_dtype)
        return lambda: out
    loaded = s.load(name, stored)
    stored = None  # narrow stored copies are not needed once converted
    kept = s.untouched(name, info.shape)  # an observed tensor the method leaves as an input: that input
    factors = s.factors(name) if not kept and method.low_rank_aware else None
    if kept:
        work = _done(loaded[SOURCE_POSITION[kept]])
    elif pool is not None:
        work = pool.submit(name, loaded, factors)
    else:
        work = _done(method.merge_tensor(name, *loaded, factors))

    def finish() -> torch.Tensor:
        merged = work()
        subspaces = None if kept else method.subspaces(name)  # asked once, so the method can let them go
        if not all_finite(merged):
            raise NufiltError(f"method {s.method_name} produced NaN/Inf for tensor '{name}'")
        out = merged.to(device="cpu", dtype=info.torch_dtype)
        watching = s.watchers.get(name, [])
        if watching:
            as_written = out.to(device=merged.device, dtype=merged.dtype)
            for observer in watching:
                observer.observe(name, *loaded, as_written, subspaces)
        return out

    return finish


def _merge_pass(s: _Step, method: MergeMethod, tmp: Path,
                report: Callable[[str, int, int, str], None]) -> tuple[str, dict[str, str]]:
    """The output's tensors, written in the base's order into `tmp`; returns the output's content hash and
    its tensors' hash lines. Reading and writing stay in order. With a pool, the method's heavy tensors are
    merged on it, the rest here; tensors wait to be written within a window of elements (see `_Window`), so
    that a long matrix at the head does not leave the other workers idle."""
    plan = [(n, i.dtype, i.shape) for n, i in s.base.tensors.items()]
    writer = StreamingWriter(tmp, plan, output_shard_bytes(s.req.max_shard_bytes, s.base))
    pending: deque[tuple[int, str, Callable[[], torch.Tensor]]] = deque()

    with torch.no_grad(), matrix_pool(method, s.req.executor, s.workers, s.req.ray_address,
                                           s.ray_device) as pool:
        heavy = {n: pool is not None and i.is_float and method.heavy(n, i.shape) for n, i in s.base.tensors.items()}
        window = _Window(pool.slots if pool else 0,
                         max((s.base.tensors[n].numel for n, h in heavy.items() if h), default=0))

        def write_oldest() -> None:
            i, name, finish = pending.popleft()
            writer.write(name, finish())
            window.remove(s.base.tensors[name].numel, heavy[name])
            report("merge", i, len(plan), name)

        for i, (name, stored) in enumerate(read_ahead(list(s.base.tensors), partial(s.stored, writing=True),
                                                      partial(s.stored_bytes, writing=True)), 1):
            numel = s.base.tensors[name].numel
            while pending and not window.fits(numel, heavy[name]):
                write_oldest()
            pending.append((i, name, _begin(s, method, name, stored, pool if heavy[name] else None)))
            window.add(numel, heavy[name])
        while pending:
            write_oldest()
    return writer.close(), writer.digests


class _Window:
    """Which tensors may be merged or waiting to be written at once, counted in elements. Heavy ones (on the
    pool) hold three inputs and the method's work space: at most `slots` of the largest at once, the peak of
    a pool with a matrix per slot; all together at most one such matrix more (finished cheap ones waiting
    behind a heavy one). With equal matrices that is a matrix per slot, as a count would allow; with
    unequal ones (a Vision Transformer's fc2 beside its attention) the small ones go on while a big one
    runs. Without a pool nothing waits: each tensor is written before the next is read."""

    def __init__(self, slots: int, largest: int):
        self.heavy_limit, self.total_limit = slots * largest, (slots + 1) * largest if slots else 0
        self.heavy = self.total = 0

    def fits(self, numel: int, heavy: bool) -> bool:
        return (self.total + numel <= self.total_limit
                and (not heavy or self.heavy + numel <= self.heavy_limit))

    def add(self, numel: int, heavy: bool) -> None:
        self.total += numel
        self.heavy += numel if heavy else 0

    def remove(self, numel: int, heavy: bool) -> None:
        self.add(-numel, heavy)


def _publish(tmp: Path, output: Path) -> None:
    """Rename the finished folder into place; with --overwrite the old one is moved aside first, so a
    crash keeps one of them."""
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old)
    else:
        os.rename(tmp, output)
    fsync_dir(output.parent)


def _write(s: _Step, method: MergeMethod, hashes: dict[str, str] | None,
           report: Callable[[str, int, int, str], None], started: float) -> tuple[LineageRecord, dict[str, str]]:
    """Part 4: the merge pass into a hidden temporary sibling of the output (weights, side files, lineage
    record, all fsynced), renamed into place only when complete; removed on any failure. In one pass the
    inputs' hashes, the lineage checks and the observers' verdicts come after the merge pass, still before
    anything is published. Returns the record and the output's hash lines."""
    req, output = s.req, Path(s.req.output)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()  # inside: a signal right after it must not leave the folder behind
        model_sha, written = _merge_pass(s, method, tmp, report)
        if hashes is None:
            hashes = s.read_the_rest(report)
            _check_lineage(s, hashes)
        for observer in s.observers:
            observer.finish()
        copy_model_files(s, tmp)
        record = LineageRecord(
            method=s.method_name, settings=s.settings.model_dump(mode="json"), seed=s.seed, step=s.step,
            base=CheckpointRef(hashes["base"], str(req.base)),
            checkpoints=[*(s.prev_record.checkpoints if s.prev_record else []),
                         CheckpointRef(hashes["checkpoint"], str(req.checkpoint),
                                       s.new.adapter.config.base_model_name_or_path if s.new.adapter else None)],
            model_sha256=model_sha, method_state=method.state(), summary=method.summary(),
            tool=f"nufilt {__version__}", created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            device=str(s.device) if s.req.executor == "local" else f"ray tasks on {s.ray_device.type}",
            duration_seconds=round(time.perf_counter() - started, 3),
            peak_rss_bytes=peak_rss_bytes())
        record.write(tmp)
        fsync_dir(tmp)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record, written


def copy_model_files(s: _Step, folder: Path) -> None:
    """Everything a loader needs besides the weights (config, tokenizer, generation config, nested module
    folders), file by file from the newest input that has it: the new checkpoint, else the previous merged
    model, else the base. So every output is a complete model folder, whatever form the checkpoint came in."""
    chosen: dict[str, Path] = {}
    for ckpt in (s.base, s.previous, s.new):  # later ones win
        if ckpt is not None:
            chosen.update(ckpt.side_files(s.req.reserved_names))
    for relative, source in sorted(chosen.items()):
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # the mode of a new file (the umask's), not the source's
    for sub in sorted({p for r in chosen for p in Path(r).parents if p != Path(".")}, reverse=True):
        fsync_dir(folder / sub)


def stored_eps(s: _Step) -> dict[str, float]:
    """Per float tensor, the coarsest rounding (machine epsilon) among the dtypes the inputs store it in (an
    adapter's: the base's and those of its factors)."""
    def dtypes(c: Checkpoint, name: str) -> list[torch.dtype]:
        if c.adapter is None:
            return [c.tensors[name].torch_dtype]
        own = c.adapter.dtype_of(name)
        return [s.base.tensors[name].torch_dtype, *([own] if own else [])]

    inputs = [c for c in (s.base, s.previous, s.new) if c is not None]
    return {name: max(torch.finfo(d).eps for c in inputs for d in dtypes(c, name))
            for name, info in s.base.tensors.items() if info.is_float}


def merge_step(req: MergeRequest, progress: ProgressFn | None = None) -> MergeResult:
    """One step, in the four parts the module docstring lists; seconds per phase in the result."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def report(phase: str, index: int, total: int, name: str) -> None:
        interrupts.check_for_stop()  # after every tensor of every pass: a stop whose raise was dropped
        if progress:
            progress(Progress(phase, index, total, name, time.perf_counter() - t0))

    s = _resolve(req)
    hashes = _preflight(s, report)
    seconds["check"] = time.perf_counter() - t0
    method = s.method_cls(s.settings, StepContext(step=s.step, seed=s.seed, device=s.device,
                                                  names=list(s.base.tensors),
                                                  previous_state=s.prev_record.method_state if s.prev_record else {},
                                                  eps=stored_eps(s)))
    # matrices in parallel, one torch and one BLAS thread each: a matrix's result is the same for any number
    # of workers (one thread's arithmetic), so the output's bytes are too
    parallel = s.device.type == "cpu" and method.parallel_safe
    s.workers = cpu_workers(req.workers) if parallel else 1
    with torch_threads(1) if parallel else nullcontext(), one_blas_thread() if parallel else nullcontext():
        t = time.perf_counter()
        _statistics(s, method, report)
        seconds["statistics"] = time.perf_counter() - t
        t = time.perf_counter()
        record, written = _write(s, method, hashes, report, t0)
        seconds["merge"] = time.perf_counter() - t
    digests = StepDigests(s.digests, written) if s.digests is not None else None
    return MergeResult(Path(req.output), record, seconds, s.scores.scores() if s.scores else None, digests)


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
