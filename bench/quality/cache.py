"""Stage outputs appear whole or not at all: build in a hidden sibling, then rename into place."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the commands' default folders: stage outputs in bench/cache, results (reports, per-order runs) in bench/results
CACHE_DIR = Path(__file__).resolve().parent.parent / "cache"
RESULTS_DIR = CACHE_DIR.parent / "results"


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)  # fails when the target exists and is not empty
        except OSError:
            if not target.exists():
                raise
            # another run built the same stage meanwhile (same recipe, same content): keep theirs, since
            # replacing it would pull the folder from under a run that is reading it
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)
