"""The peak RSS a merge reports is its own process's, not its parent's (Linux carries ru_maxrss over fork+exec)."""

from __future__ import annotations

import json
import subprocess
import sys

from nufilt_core.peak_memory import peak_rss_bytes

BIG = 1024**3


def test_a_child_started_by_a_big_parent_reports_its_own_peak():
    held = bytearray(BIG)
    held[::4096] = b"\x01" * (BIG // 4096)  # one byte a page touched: resident in this process
    assert peak_rss_bytes() >= BIG
    code = ("import json, resource; from nufilt_core.peak_memory import peak_rss_bytes; "
            "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    own, inherited = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout)
    del held
    assert inherited >= BIG  # what ru_maxrss says: the parent's RSS at the fork
    assert own < BIG / 2  # the child's own: an interpreter and nufilt_core's imports
