"""The benchmark's stage cache: whole or nothing, and a stage finished meanwhile by another run is kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.quality.cache import atomic_dir


def test_a_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "stage"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_stage_another_run_finished_meanwhile_is_kept(tmp_path):
    target = tmp_path / "stage"
    with atomic_dir(target) as tmp:
        (tmp / "mine").write_text("late")
        target.mkdir()  # the other run renamed its copy into place first; a reader may hold it
        (target / "theirs").write_text("first")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # our hidden copy is gone
