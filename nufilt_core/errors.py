"""Errors the merge engine raises for bad input: each names the file and, where it can, the tensor."""

from __future__ import annotations

from pathlib import Path


class NufiltError(Exception):
    """Base class for every error nufilt reports to a user (no traceback needed)."""

    exit_code = 1  # what the CLI exits with


class CheckpointError(NufiltError):
    """A checkpoint (or merged model) that cannot be used: unreadable, incomplete or mismatched."""

    def __init__(self, path: str | Path, message: str, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {message}")


class LineageError(NufiltError):
    """The previous merged model does not continue this chain (other base, other method, ...). `culprit` names
    the input at fault: "previous" (its record or weights), "base" (another base than the chain's), "settings"
    (another method), or "checkpoint" (it was merged before): only the last is the new checkpoint's own."""

    def __init__(self, message: str, culprit: str = "previous"):
        self.culprit = culprit
        super().__init__(message)


class SettingsError(NufiltError):
    """A method setting or option that is out of range or unknown."""


class ClusterError(NufiltError):
    """The Ray cluster a merge was told to use cannot be reached or joined: a configuration error."""

    exit_code = 78  # EX_CONFIG, as the daemon's other configuration errors
