"""The folder source (real watchdog on a real folder) and intake (emit → staged copy → journal)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import wait_for
from nufilt_daemon.config import FolderSettings
from nufilt_daemon.intake import Intake, content_hash
from nufilt_daemon.journal import Journal
from nufilt_daemon.sources.base import Arrival, Source
from nufilt_daemon.sources.folder import PROCESSED_DIR, FolderSource
from nufilt_daemon.states import JobState


class Collector:
    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.lock = threading.Lock()

    def __call__(self, arrival: Arrival) -> None:
        # what intake does before returning: the entry must still be there, complete
        assert arrival.path.exists()
        with self.lock:
            self.arrivals.append(arrival)

    def names(self) -> list[str]:
        with self.lock:
            return [a.reference for a in self.arrivals]


def start(inbox: Path, **kw: object) -> tuple[FolderSource, Collector]:
    settings = FolderSettings(settle_seconds=0.2, rescan_interval_seconds=kw.pop("rescan", 30.0), **kw)
    src = FolderSource(inbox, settings)
    assert isinstance(src, Source)
    got = Collector()
    src.start(got)
    return src, got


def rename_in(src: Path, inbox: Path, name: str) -> None:
    tmp = inbox / f"tmp-{name}"
    shutil.copytree(src, tmp) if src.is_dir() else shutil.copy2(src, tmp)
    os.rename(tmp, inbox / name)


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_renamed_checkpoints_arrive_once_and_temporary_names_never(tiny: dict[str, Path], tmp_path: Path,
                                                                   polling: bool):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "early.safetensors").write_bytes((tiny["t3"] / "model.safetensors").read_bytes())  # before start
    src, got = start(inbox, polling=polling, poll_interval_seconds=0.1)
    try:
        assert src.healthy()
        rename_in(tiny["t1"], inbox, "task1")
        rename_in(tiny["t2"] / "model.safetensors", inbox, "task2.safetensors")
        (inbox / ".hidden.safetensors").write_bytes(b"x")
        (inbox / "tmp-upload").mkdir()
        (inbox / "big.safetensors.partial").write_bytes(b"x")
        wait_for("three arrivals", lambda: len(got.names()) >= 3, timeout=15)
        # Would a second event, or our own moves into .processed, emit again? Those events are queued
        # before a later arrival's, and the one scanner thread notes and settles entries in that order:
        # once a checkpoint dropped after the moves is through, anything they would emit has been.
        wait_for("the three set aside", lambda: len(list((inbox / PROCESSED_DIR).iterdir())) == 3, timeout=15)
        rename_in(tiny["t3"], inbox, "zz-later")  # a folder: a polling diff lists it after the deletions moves leave
        wait_for("the later arrival", lambda: "zz-later" in got.names(), timeout=15)
        assert sorted(got.names()) == ["early.safetensors", "task1", "task2.safetensors", "zz-later"]
        assert got.names()[-1] == "zz-later"  # nothing of the first three came again, before it or with it
        assert {a.source for a in got.arrivals} == {"folder"}
        wait_for("the later one set aside", lambda: len(list((inbox / PROCESSED_DIR).iterdir())) == 4, timeout=15)
        processed = sorted(p.name.split("-", 1)[1] for p in (inbox / PROCESSED_DIR).iterdir())
        assert processed == ["early.safetensors", "task1", "task2.safetensors", "zz-later"]
        assert sorted(p.name for p in inbox.iterdir()) == [".hidden.safetensors", PROCESSED_DIR,
                                                           "big.safetensors.partial", "tmp-upload"]
    finally:
        src.stop()
    assert not src.healthy()


def test_a_folder_written_in_place_waits_for_its_marker_or_for_all_its_shards(tiny: dict[str, Path],
                                                                              tmp_path: Path):
    from models import base_state, write_model

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sharded = write_model(base_state(seed=5), tmp_path / "sharded", shards=2)
    src, got = start(inbox, rescan=0.3)
    try:
        # copied by hand, file by file, no rename: the index names a shard not there yet
        slow = inbox / "slow"
        slow.mkdir()
        shutil.copy2(sharded / "model.safetensors.index.json", slow)
        shutil.copy2(sharded / "model-00001-of-00002.safetensors", slow)
        # a folder with a marker is handed on as soon as it settles
        marked = inbox / "marked"
        shutil.copytree(tiny["t1"], marked)
        (marked / "_COMPLETE").touch()
        wait_for("the marked folder", lambda: "marked" in got.names(), timeout=10)
        # the source looked at the settled folder and decided to wait: it says why, naming the missing shard
        wait_for("the slow folder waiting", lambda: [e["reason"] for e in src.entries() if e["name"] == "slow"
                                                     and "model-00002-of-00002" in (e["reason"] or "")], timeout=10)
        assert "slow" not in got.names()
        shutil.copy2(sharded / "model-00002-of-00002.safetensors", slow)
        wait_for("the completed shards", lambda: "slow" in got.names(), timeout=10)
    finally:
        src.stop()


def test_an_entry_that_never_opens_is_handed_on_after_the_timeout(tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "junk.safetensors").write_bytes(b"\x00" * 100)
    (inbox / "notes.txt").write_text("not a checkpoint")
    src, got = start(inbox, incomplete_timeout_seconds=0.8)
    try:
        wait_for("the junk file", lambda: got.names() == ["junk.safetensors"], timeout=10)
        wait_for("notes.txt set aside", lambda: not (inbox / "notes.txt").exists(), timeout=5)
        assert got.names() == ["junk.safetensors"]
    finally:
        src.stop()


def test_folders_whose_weights_are_only_pickles_are_handed_on_at_once(tmp_path: Path):
    """A Hugging Face folder with pytorch_model.bin, a PEFT adapter with adapter_model.bin: waiting cannot make
    either a checkpoint, so they go to the journal (rejected with the conversion hint) without the timeout."""
    inbox = tmp_path / "inbox"
    for name, files in (("hf-bin", ("config.json", "pytorch_model.bin")),
                        ("adapter-bin", ("adapter_config.json", "adapter_model.bin"))):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}")
    inbox.mkdir()
    src, got = start(inbox, incomplete_timeout_seconds=600)
    try:
        for name in ("hf-bin", "adapter-bin"):
            os.rename(tmp_path / name, inbox / name)
        wait_for("both handed on", lambda: sorted(got.names()) == ["adapter-bin", "hf-bin"], timeout=15)
    finally:
        src.stop()


@pytest.mark.parametrize("case", ["long-name", "cannot-move"])
def test_a_journaled_entry_is_never_journaled_again_by_the_rescans(tiny: dict[str, Path], tmp_path: Path, case: str):
    """A name the time stamp would push past 255 bytes, and an entry the source cannot move aside (here
    `.processed` is a file): each is journaled once, not copied, hashed and journaled as a duplicate at every
    rescan; the one left in the inbox shows as an error entry saying what to do."""
    journal = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: None)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    name = "t" * 240 + ".safetensors" if case == "long-name" else "task1"
    if case == "cannot-move":
        (inbox / PROCESSED_DIR).write_text("a file where the folder belongs")
    if case == "long-name":  # written beside the inbox (a tmp- prefix would not fit), then renamed in
        shutil.copy2(tiny["t1"] / "model.safetensors", tmp_path / "w.safetensors")
        os.rename(tmp_path / "w.safetensors", inbox / name)
    else:
        rename_in(tiny["t1"], inbox, name)
    src = FolderSource(inbox, FolderSettings(settle_seconds=0.1, rescan_interval_seconds=0.2))
    src.start(intake.emit)
    try:
        wait_for("journaled", lambda: journal.jobs(), timeout=20)
        time.sleep(1.5)  # several rescans
        assert [j.state for j in journal.jobs()] == [JobState.QUEUED]
        if case == "long-name":
            moved = list((inbox / PROCESSED_DIR).iterdir())
            assert len(moved) == 1 and moved[0].name.endswith(name[-40:]) and len(os.fsencode(moved[0].name)) <= 255
            assert src.entries() == []
        else:
            assert (inbox / name).exists()
            [entry] = src.entries()
            assert entry["state"] == "error" and "cannot be moved out of the inbox" in entry["reason"]
    finally:
        src.stop()


def test_a_dead_observer_is_seen_and_a_restart_detects_again(tiny: dict[str, Path], tmp_path: Path):
    inbox = tmp_path / "inbox"
    src, got = start(inbox)
    try:
        src._observer.stop()  # what an exception in a handler thread does to the observer
        src._observer.join(5)
        assert not src.healthy()
        src.stop()
        src.start(got)
        assert src.healthy()
        rename_in(tiny["t1"], inbox, "after-restart")
        wait_for("arrival after restart", lambda: got.names() == ["after-restart"], timeout=10)
    finally:
        src.stop()


def test_intake_stages_a_private_copy_and_journals_it(tiny: dict[str, Path], tmp_path: Path):
    journal = Journal.in_state_dir(tmp_path / "state")
    seen = []
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: seen.append(job.state))
    inbox = tmp_path / "inbox"
    shutil.copytree(tiny["t1"], inbox / "task1")
    intake.emit(Arrival(inbox / "task1", "folder", "task1"))
    job = journal.jobs()[0]
    assert job.state == JobState.QUEUED and job.sha256 == content_hash(tiny["t1"])
    staged = Path(job.staged_path)
    assert staged.name == "task1" and staged.is_relative_to(tmp_path / "state" / "staged")
    # a real copy (never a hard link): deleting the inbox copy loses nothing
    assert (staged / "model.safetensors").stat().st_ino != (inbox / "task1/model.safetensors").stat().st_ino
    shutil.rmtree(inbox / "task1")
    assert content_hash(staged) == job.sha256

    # the same content again is a duplicate and gets no staged copy
    shutil.copytree(tiny["t1"], inbox / "again")
    intake.emit(Arrival(inbox / "again", "folder", "again"))
    assert journal.jobs()[0].state == JobState.DUPLICATE and len(list((tmp_path / "state" / "staged").iterdir())) == 1

    # an unreadable file is journaled as rejected, with the reason naming it
    (inbox / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    intake.emit(Arrival(inbox / "broken.safetensors", "folder", "broken.safetensors"))
    broken = journal.jobs()[0]
    assert broken.state == JobState.REJECTED and "broken.safetensors" in broken.reason
    assert seen == [JobState.QUEUED, JobState.DUPLICATE, JobState.REJECTED]

    # a staged copy no job refers to (a crash between staging and committing) is collected
    (tmp_path / "state" / "staged" / "leftover").mkdir()
    assert [p.name for p in intake.gc_staged()] == ["leftover"]
    assert json.loads(json.dumps(job.sha256)) == job.sha256


def rewrite_in_place(path: Path) -> None:
    """What a careless writer does: new bytes into the same inode (a hard link would see them)."""
    with path.open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        last = f.read(8)
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in last))


@pytest.mark.parametrize("shards", [0, 3], ids=["single-file", "sharded"])
def test_the_staged_copy_is_private_and_a_rewrite_in_place_leaves_it_alone(tmp_path: Path, shards: int):
    from models import base_state, write_model

    journal = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: None)
    folder = write_model(base_state(seed=3), tmp_path / "inbox" / "entry", shards=max(shards, 1))
    entry = folder / "model.safetensors" if shards == 0 else folder
    original = content_hash(entry)
    intake.emit(Arrival(entry, "folder", entry.name))
    job = journal.jobs()[0]
    assert job.state == JobState.QUEUED and job.sha256 == original  # the hash of the bytes copied is the same
    staged = Path(job.staged_path)
    pairs = [(entry, staged)] if shards == 0 else [(folder / p.name, p) for p in staged.iterdir()]
    assert len(pairs) == (1 if shards == 0 else 5)  # 3 shards, the index, config.json
    before = {copy: copy.read_bytes() for _, copy in pairs}
    for source, copy in pairs:
        assert source.read_bytes() == copy.read_bytes()
        assert copy.stat().st_ino != source.stat().st_ino and copy.stat().st_nlink == 1
    for weights in sorted(folder.glob("*.safetensors")):
        rewrite_in_place(weights)
    assert content_hash(entry) != original
    assert {copy: copy.read_bytes() for _, copy in pairs} == before and content_hash(staged) == original


def test_an_index_file_on_its_own_is_rejected_and_its_folder_never_copied(tmp_path: Path):
    from models import base_state, write_model

    journal = Journal.in_state_dir(tmp_path / "state")
    staged = tmp_path / "state" / "staged"
    intake = Intake(journal, staged, lambda job, arrival: None)
    index = write_model(base_state(seed=3), tmp_path / "inbox", shards=2) / "model.safetensors.index.json"
    intake.emit(Arrival(index, "folder", index.name))
    job = journal.jobs()[0]
    assert job.state == JobState.REJECTED and "index file on its own" in job.reason and os.listdir(staged) == []


def rchar() -> int:
    """Bytes this process (all its threads) has read with read-like system calls, cache hits included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_the_intake_reads_the_checkpoint_bytes_once(tiny: dict[str, Path], tmp_path: Path):
    """Copy and content hash come from one read: about one size of the weights, not two."""
    import torch
    from models import write_model

    journal = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: None)
    intake.emit(Arrival(tiny["t1"], "folder", "warm-up"))  # lazy imports, the journal's first pages
    g = torch.Generator().manual_seed(7)
    state = {f"layer.{i}.weight": torch.randn(512, 1024, generator=g) for i in range(8)}  # 16 MiB
    entry = write_model(state, tmp_path / "inbox" / "big", shards=2)
    weights = sum(p.stat().st_size for p in entry.glob("*.safetensors"))
    before = rchar()
    intake.emit(Arrival(entry, "folder", "big"))
    ratio = (rchar() - before) / weights
    assert journal.jobs()[0].state == JobState.QUEUED and journal.jobs()[0].sha256 == content_hash(entry)
    assert 0.9 < ratio < 1.3, ratio


def test_an_entry_whose_intake_keeps_failing_leaves_nothing_backs_off_and_is_failed_after_n(
        tiny: dict[str, Path], tmp_path: Path):
    journal = Journal.in_state_dir(tmp_path / "state")
    # a real SQLite error at the commit of the queued job, after the copy was staged (as a full disk
    # or a name the journal cannot encode did): the rejection at the end may still be written
    journal._db.execute("CREATE TRIGGER full BEFORE INSERT ON jobs WHEN NEW.state = 'queued' "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    staged = tmp_path / "state" / "staged"
    intake = Intake(journal, staged, lambda job, arrival: None)
    calls: list[float] = []
    ends: list[float] = []
    leftovers: list[list[str]] = []

    def emit(arrival: Arrival) -> None:
        calls.append(time.monotonic())
        try:
            intake.emit(arrival)
        finally:
            leftovers.append(os.listdir(staged) if staged.exists() else [])
            ends.append(time.monotonic())

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rename_in(tiny["t1"], inbox, "task1")
    # retries 0.1, 0.2, 0.4, 0.8 s apart: the same doubling as the default 0.5 s, faster
    src = FolderSource(inbox, FolderSettings(settle_seconds=0.1, rescan_interval_seconds=30, retry_seconds=0.1))
    src.start(emit)
    try:
        wait_for("the source unhealthy", lambda: not src.healthy(), timeout=20)
        entry = src.entries()[0]
        assert entry["name"] == "task1" and entry["state"] == "error" and "disk is full" in entry["reason"]
        assert src.health()["errors_total"] >= 3
        # failed, not rejected: the disk's fault, so the same checkpoint is no duplicate when dropped again
        wait_for("the failure", lambda: journal.jobs() and journal.jobs()[0].state == JobState.FAILED, timeout=20)
        wait_for("the entry set aside", lambda: not (inbox / "task1").exists(), timeout=5)
        assert src.healthy() and src.entries() == []
    finally:
        src.stop()
    job = journal.jobs()[0]
    assert "intake failed 5 times" in job.reason and "disk is full" in job.reason
    assert len(calls) == 5 and leftovers == [[]] * 5  # all or nothing: no staged copy left by any try
    # the wait from the end of one try to the start of the next: a try's own copy and hash take time
    # too, more on a loaded host
    gaps = [start - end for end, start in zip(ends, calls[1:], strict=False)]
    # each wait at least its doubling delay (0.1, 0.2, 0.4, 0.8 s), never far beyond it (a 0.05 s tick)
    assert all(0.1 * 2**i <= gap < 0.1 * 2**i + 0.5 for i, gap in enumerate(gaps)), gaps


def test_links_in_the_inbox_are_rejected_at_once_and_deleting_one_never_touches_its_target(tmp_path: Path):
    journal = Journal.in_state_dir(tmp_path / "state")
    intake = Intake(journal, tmp_path / "state" / "staged", lambda job, arrival: None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.symlink(outside, inbox / "dir-link")
    os.symlink("/etc", inbox / "etc")
    src = FolderSource(inbox, FolderSettings(settle_seconds=0.1, after="delete"))  # the 600 s timeout: not waited
    src.start(intake.emit)
    try:
        wait_for("both journaled", lambda: len(journal.jobs()) == 2, timeout=10)
        wait_for("both links removed", lambda: os.listdir(inbox) == [], timeout=5)
    finally:
        src.stop()
    assert {j.state for j in journal.jobs()} == {JobState.REJECTED}
    assert all("symbolic link" in j.reason for j in journal.jobs())
    assert (outside / "keep.txt").read_text() == "precious" and Path("/etc/passwd").exists()
