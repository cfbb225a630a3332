"""nufilt daemon: keeps one production model up to date by merging each new checkpoint with NUFILT.

Pipeline, one module each: sources/ (folder, MLflow) → journal (SQLite, durable) → worker (one
merge at a time, in a child process) → gate (checks and scores) → promoter (store versions,
production symlink) → publishers/ (MLflow, through a durable outbox). The supervisor wires them.
"""

from nufilt_core import __version__

__all__ = ["__version__"]
