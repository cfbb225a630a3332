"""Where checkpoints come from. Each source finds complete checkpoints and hands them to `emit`,
which journals them durably before returning; sources never merge anything themselves."""

from .base import Arrival, Emit, InboxEntry, Source, SourceHealth

__all__ = ["Arrival", "Emit", "InboxEntry", "Source", "SourceHealth"]
