"""A SIGTERM whose KeyboardInterrupt CPython drops (raised inside a finalizer) still stops a merge."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nufilt_core import interrupts
from nufilt_core.merge import MergeRequest, Progress, merge_step


@pytest.fixture
def unwinding() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupts.unwind_on_signals()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    interrupts.clear()


class SignalsItselfWhenCollected:
    """Sends this process SIGTERM from its `__del__`, and runs bytecode there, so the handler runs inside
    the finalizer: the place where CPython reports the KeyboardInterrupt as unraisable and drops it."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):
            if interrupts._pending is not None:
                break


def test_a_sigterm_swallowed_by_a_finalizer_still_stops_the_merge(tiny: dict[str, Path], tmp_path: Path,
                                                                  unwinding: None, monkeypatch: pytest.MonkeyPatch):
    dropped: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    m1 = tmp_path / "m1"
    merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=m1))

    def progress(p: Progress) -> None:
        if p.phase == "merge" and p.index == 1:
            SignalsItselfWhenCollected()  # collected at once: the signal comes, and its exception is lost

    out = tmp_path / "work" / "m2"
    request = MergeRequest(base=tiny["base"], previous=m1, checkpoint=tiny["t2"], output=out)
    with pytest.raises(KeyboardInterrupt):
        merge_step(request, progress)
    assert dropped == [KeyboardInterrupt]  # the premise: the handler's own raise never reached the merge
    assert list(out.parent.iterdir()) == []  # neither the output nor its hidden temporary

    interrupts.clear()  # the stop was acted on: a later merge in this process runs to its end
    merge_step(request)
    assert (out / "model.safetensors").is_file()
