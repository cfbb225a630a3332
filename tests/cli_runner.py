"""The real `nufilt` console script, run as a subprocess: what a user types."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `nufilt ARGS`; with `check`, a non-zero exit fails the test with its stderr."""
    exe = Path(sys.executable).parent / "nufilt"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"nufilt {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
