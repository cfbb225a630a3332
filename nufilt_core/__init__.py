"""nufilt_core: the streaming continual-merge engine (NUFILT and its baselines)."""

from __future__ import annotations

__version__ = "0.1.0"

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
