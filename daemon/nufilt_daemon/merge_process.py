"""The child process that merges and checks one candidate: `python -m nufilt_daemon.merge_process`.

Why a child process per job: a merge holds large tensors and may run out of memory, segfault in a
native library, or be OOM-killed; in a child that ends only this job (the worker reports the
signal), the daemon keeps running, and every byte is returned to the OS afterwards. The cost is
one interpreter start and torch import per job (about a second); the worker starts the next job's
process while it is idle, so that second is spent before the job arrives: the child imports
everything first, then waits for its request (an empty one, its stdin closed, means "exit").

Protocol (child_protocol.py): the request is one ChildRequest as JSON on stdin; the child writes
ChildEvent JSON lines (progress, merged, validated, error) to the file descriptor named by
--events-fd (stdout and stderr stay free for libraries' chatter, which the worker saves to
STATE/logs/).
The child asks the kernel to SIGKILL it if the daemon dies (PR_SET_PDEATHSIG), so a kill -9 of
the daemon never leaves an orphan still writing into the store.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any, Literal

from .child_protocol import ChildError, ChildEvent, ChildRequest, Merged, Progress, Validated
from .states import GateOutcome
from .store import VALIDATION_NAME

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker's cleanup at startup still applies
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class Events:
    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last_progress = 0.0

    def send(self, event: Progress | Merged | Validated | ChildError) -> None:
        self.stream.write(ChildEvent(event).model_dump_json() + "\n")
        self.stream.flush()

    def progress(self, p: Any) -> None:
        now = time.monotonic()
        if now - self.last_progress >= 2 or p.index == p.total:
            self.last_progress = now
            self.send(Progress(phase=p.phase, index=p.index, total=p.total, elapsed=round(p.elapsed, 3)))


def error_kind(exc: BaseException, checkpoint: Path | None = None) -> Literal[GateOutcome.REJECTED,
                                                                            GateOutcome.FAILED]:
    """rejected: the checkpoint (`checkpoint`, the staged copy) is bad; failed: anything else went wrong, the
    daemon's own inputs included (its base, the production version, its settings): a failed job is no
    duplicate, so the same checkpoint merges once they are repaired."""
    from nufilt_core.errors import CheckpointError, LineageError, NufiltError, SettingsError

    if isinstance(exc, SettingsError):
        return GateOutcome.FAILED
    if isinstance(exc, LineageError):
        return GateOutcome.REJECTED if exc.culprit == "checkpoint" else GateOutcome.FAILED
    if isinstance(exc, CheckpointError) and checkpoint is not None:
        path = Path(exc.path)
        return GateOutcome.REJECTED if path == checkpoint or checkpoint in path.parents else GateOutcome.FAILED
    if isinstance(exc, NufiltError):
        return GateOutcome.REJECTED
    return GateOutcome.FAILED


def describe(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of GPU memory: {str(exc).splitlines()[0]}"
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    from nufilt_core.errors import NufiltError

    return str(exc) if isinstance(exc, NufiltError) else f"{type(exc).__name__}: {exc}"


def preload() -> None:
    """Everything a merge and its checks import, loaded before the request arrives."""
    import torch  # noqa: F401

    import nufilt_core.merge
    import nufilt_core.plausibility  # noqa: F401

    try:  # what a PEFT adapter's merge asks (nufilt_core/lora.py): ≈ 4 s of imports, spent while idle
        import peft.tuners.tuners_utils  # noqa: F401
    except ImportError:
        pass

    from . import gate  # noqa: F401


def run(request: ChildRequest, events: Events) -> int:
    import torch

    from nufilt_core.checkpoint import Checkpoint
    from nufilt_core.devices import resolve_device, set_threads
    from nufilt_core.fsguard import check_tree
    from nufilt_core.merge import MergeRequest, ScoreRequest, merge_step
    from nufilt_core.plausibility import DistanceObserver

    from .gate import check_candidate

    r, gate = request, request.gate
    stage: Literal["merge", "validate"] = "merge"
    try:
        set_threads(r.threads)
        check_tree(r.checkpoint)  # the staged copy: regular files only (intake checked; never trust)
        # one pass over the bytes: the merge hashes and checks what it reads, and the different-base
        # check and the surrogate scores ride along it instead of reading the models again
        distance = DistanceObserver(r.checkpoint, gate.max_relative_distance) if gate.max_relative_distance else None
        req = MergeRequest(
            base=r.base, checkpoint=r.checkpoint, output=r.output, previous=r.previous, method=r.method,
            options=r.options, seed=r.seed, device=r.device, max_shard_bytes=r.max_shard_bytes,
            reserved_names=(VALIDATION_NAME,), check_first=False, observers=[distance] if distance else [],
            scores=ScoreRequest(gate.null_rank, gate.task_rank) if gate.scores else None, workers=r.threads,
            executor=r.executor, ray_address=r.ray_address)
        result = merge_step(req, events.progress)
        gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
        events.send(Merged(record=json.loads(result.record.to_json()), seconds=result.seconds,
                           gpu_peak_bytes=gpu_peak))
        stage = "validate"
        t0 = time.perf_counter()
        open_ = Checkpoint.open
        report = check_candidate(open_(req.base), open_(req.previous) if req.previous else None,
                                 open_(req.checkpoint), open_(req.output), result.record, gate,
                                 resolve_device(req.device), merged=result)
        if distance is not None:
            report["checks"]["distance_from_base"] = distance.distance().as_dict()
        events.send(Validated(report=report, seconds=round(time.perf_counter() - t0, 3)))
        return 0
    except BaseException as e:  # report everything, including KeyboardInterrupt from SIGINT
        traceback.print_exc(file=sys.stderr)
        events.send(ChildError(stage=stage, kind=error_kind(e, Path(r.checkpoint)), type=type(e).__name__,
                               message=describe(e)))
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args(argv)
    die_with_parent(args.parent_pid)
    from nufilt_core.interrupts import unwind_on_signals  # the engine's import, which preload() makes anyway

    unwind_on_signals()  # SIGTERM: unwind, merge_step cleans its temp
    with os.fdopen(args.events_fd, "w") as stream:
        events = Events(stream)
        preload()
        text = sys.stdin.read()
        if not text:  # released unused (the daemon stops, or it was pre-started for a job that never came)
            return 0
        try:
            request = ChildRequest.model_validate_json(text)
        except ValueError as e:  # not JSON, or not a ChildRequest (pydantic's ValidationError is a ValueError)
            events.send(ChildError(stage="request", kind=GateOutcome.FAILED, type=type(e).__name__,
                                   message=f"bad request: {e}"))
            return 2
        return run(request, events)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the candidate is written and synced and the events pipe closed: skip the interpreter's teardown
    # (freeing torch's modules, 0.3-0.8 s measured), which the worker would otherwise wait for
    os._exit(code)
