"""The default thread behaviour: torch loads with a passive OpenMP wait policy.

OpenMP reads OMP_WAIT_POLICY once, when torch loads its runtime; so what counts is the value at
the moment `torch` is imported by each entry point, seen here by an import hook in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
class SeeTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("OMP_WAIT_POLICY when torch loads:", os.environ.get("OMP_WAIT_POLICY"), flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, SeeTorch())
import {module}
"""


def policy_when_torch_loads(module: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env={**clean, **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("OMP_WAIT_POLICY when torch loads:"))
    return line.rsplit(":", 1)[1].strip()


@pytest.mark.parametrize("module", ["nufilt_daemon.cli", "nufilt_daemon.merge_process", "nufilt_core.cli"])
def test_entry_points_load_torch_with_a_passive_wait_policy(module: str) -> None:
    assert policy_when_torch_loads(module) == "PASSIVE"


def test_a_wait_policy_the_user_set_wins() -> None:
    assert policy_when_torch_loads("nufilt_daemon.cli", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
