"""nufilt_core: the streaming continual-merge engine (NUFILT and its baselines)."""

from __future__ import annotations

import os

# torch's OpenMP threads spin-wait for each other by default, and beside a busy process the
# spinning takes the time a descheduled sibling needs (measured: a step 1.5–1.8× slower than on
# one thread, or stalled for minutes). A passive wait policy, read once when torch loads, does not
# collapse and keeps the idle speed (bench/speed/threads.py). A value the user set wins; it only
# works when nufilt_core is imported before torch, as in the CLI and the daemon's merge child.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__
from .errors import CheckpointError, LineageError, NufiltError, SettingsError
from .merge import MergeRequest, MergeResult, continual_merge, merge_step

__all__ = [
    "CheckpointError",
    "LineageError",
    "MergeRequest",
    "MergeResult",
    "NufiltError",
    "SettingsError",
    "__version__",
    "continual_merge",
    "merge_step",
]
