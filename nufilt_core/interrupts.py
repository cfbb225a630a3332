"""SIGTERM and SIGINT that unwind the work like Ctrl-C, and that the engine does not lose.

`signal.default_int_handler` raises KeyboardInterrupt wherever the main thread is when CPython runs the
handler, between two bytecodes, and some places drop it: a finalizer (`__del__`, an abandoned generator)
reports it as "Exception ignored", and the imports SciPy makes when a merge first needs it swallowed it
without a word (bench/reliability/sigterm.py: 1 of 100 SIGTERMs sent as a merge began, one core busy,
lost that way; the merge went on, and a CI run waited 300 s for it). So the handler also records the
signal, and the engine's long loops call `check_for_stop()`, which raises again until someone
acknowledges the stop (`clear()`, where KeyboardInterrupt is caught and the work is given up).
"""

from __future__ import annotations

import signal
from types import FrameType

_pending: signal.Signals | None = None


def unwind_on_signals() -> None:
    """From now on SIGTERM, like SIGINT, raises KeyboardInterrupt (so `finally` blocks remove temporaries)
    and is remembered for `check_for_stop()`."""
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, _raise)


def _raise(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = signal.Signals(signum)
    raise KeyboardInterrupt(_pending.name)


def check_for_stop() -> None:
    """Raise KeyboardInterrupt if a signal came and the stop it asked for is still pending: its own raise
    may have been dropped (see above). Cheap enough for every step of an optimiser's loop."""
    if _pending is not None:
        raise KeyboardInterrupt(_pending.name)


def clear() -> None:
    """The stop is done (the caller caught KeyboardInterrupt and gives up its work): forget the signal."""
    global _pending
    _pending = None
