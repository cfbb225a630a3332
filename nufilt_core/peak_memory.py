"""The process's own peak resident memory.

`getrusage(RUSAGE_SELF).ru_maxrss` is not it: Linux carries the high-water mark across fork and
exec, so a child started by a big parent (the daemon, a benchmark that generated its models) reports
at least the parent's RSS at the fork. The kernel's VmHWM in /proc/self/status belongs to the
process's own memory map, made fresh at exec; ru_maxrss is the fallback where /proc is missing.
"""

from __future__ import annotations

import re
import resource

VM_HWM = re.compile(r"VmHWM:\s+(\d+) kB")


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            found = VM_HWM.search(f.read())
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, where /proc exists anyway
