"""What a merge that fails must leave behind: nothing, beside a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from nufilt_core.merge import MergeRequest, merge_step


def leftovers(folder: Path) -> list[str]:
    """The hidden entries in `folder`: a merge's temporary output siblings, if any remained."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def expect_error(tmp_path: Path, req: MergeRequest, error: type[Exception], *needles: str) -> None:
    """merge_step(req) raises `error` whose message holds every needle, and writes nothing."""
    with pytest.raises(error) as info:
        merge_step(req)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not Path(req.output).exists()
    assert leftovers(Path(req.output).parent) == []
