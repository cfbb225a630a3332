"""Print the different-base statistic (nufilt_core/plausibility.py) of checkpoints against a base.

    .venv/bin/python scripts/distance_from_base.py BASE CHECKPOINT [CHECKPOINT ...]

One line per checkpoint: the median and the largest ‖θ_t − θ0‖_F / ‖θ0‖_F over the 2-D float
tensors, and whether the daemon's default bound (gate.max_relative_distance) would reject it.
Used to justify the default on real fine-tunes (docs/daemon.md, "A different base").
"""

from __future__ import annotations

import sys
from pathlib import Path

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import NufiltError
from nufilt_core.plausibility import DEFAULT_MAX_RELATIVE_DISTANCE, distance_from_base


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        base = Checkpoint.open(Path(argv[0]))
        for path in argv[1:]:
            d = distance_from_base(base, Checkpoint.open(Path(path)))
            verdict = "REJECTED" if d.median > DEFAULT_MAX_RELATIVE_DISTANCE else "ok"
            print(f"median {d.median:.4f}  max {d.max:.4f} ({d.max_tensor})  over {d.tensors} matrices  "
                  f"{verdict:<8} {path}")
    except NufiltError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
