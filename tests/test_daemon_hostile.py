"""The real daemon fed the hostile corpus (tests/hostile.py): every entry journaled as rejected with a
reason naming it, good checkpoints behind them promoted, nothing from outside an entry in the store,
every entry visible (status, gauge), odd names stored and shown safely."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, wait_for
from hostile import SECRET, write_corpus
from models import base_state, finetune, write_model
from nufilt_daemon.intake import content_hash
from nufilt_daemon.names import printable

pytestmark = pytest.mark.slow

ODD_GOOD = b"odd\xff\nname.safetensors"  # not UTF-8, and a newline: a valid checkpoint all the same
ODD_JUNK = "esc\x1b[2Jjunk.safetensors"  # a terminal escape in a broken file's name


def store_bytes(store: Path) -> list[bytes]:
    out = []
    for root, _, files in os.walk(store):
        for f in files:
            p = Path(root) / f
            if p.is_symlink():
                continue
            try:
                out.append(p.read_bytes())
            except FileNotFoundError:  # the running daemon's own short-lived files (its write check)
                continue
    return out


def test_the_hostile_corpus_is_journaled_rejected_and_good_checkpoints_behind_it_promoted(tmp_path: Path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    t1, t2, t3 = (write_model(finetune(base, i), tmp_path / f"t{i}") for i in (1, 2, 3))
    d = DaemonProcess(tmp_path / "svc", b, folder={"incomplete_timeout_seconds": 1.0})
    expect = write_corpus(d.inbox, t1, tmp_path / "outside")  # t1's weights are what the links point at
    (d.inbox / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    expect["pytorch_model.bin"] = "pickle"
    (d.inbox / ODD_JUNK).write_bytes(b"\x00" * 40)
    expect[ODD_JUNK] = "header"
    (d.inbox / "notes.txt").write_text("not a checkpoint")
    d.start()
    try:
        d.drop(t2, "good")
        shutil.copy2(t3 / "model.safetensors", tmp_path / "odd.tmp")
        os.rename(os.fsencode(tmp_path / "odd.tmp"), os.fsencode(d.inbox) + b"/" + ODD_GOOD)
        n = len(expect) + 2
        wait_for("every entry journaled", lambda: len(d.jobs()) == n, timeout=120)
        wait_for("two promotions", lambda: len(d.in_states("promoted")) == 2, timeout=120)
        jobs = {j["reference"]: j for j in d.jobs()}
        for name, fragment in expect.items():
            job = jobs[printable(name)]
            assert job["state"] == "rejected", job
            assert printable(name) in job["reason"] and fragment.lower() in job["reason"].lower(), job
        assert "Convert it" in jobs["pytorch_model.bin"]["reason"]  # the conversion hint, as for a folder
        odd = jobs[printable(os.fsdecode(ODD_GOOD))]
        assert odd["state"] == "promoted" and odd["reference"] == "odd\\xff\\nname.safetensors"
        assert jobs["good"]["state"] == "promoted"
        # contained as named errors: the scanner never failed, no intake had to be retried
        assert not d.logged("folder_source_error") and not d.logged("inbox_entry_error")
        assert not d.logged("intake_failed") and not d.logged("job_error")
        assert {j["sha256"] for j in d.in_states("promoted")} == {content_hash(t2), content_hash(t3)}
        # nothing from outside an entry reached the store: not the secret, not the linked weights
        everything = store_bytes(d.store)
        assert everything and not any(SECRET.encode() in data for data in everything)
        assert (t1 / "model.safetensors").read_bytes() not in everything
        assert (tmp_path / "outside" / "secret.txt").read_text() == SECRET  # and nothing was written there
        # every entry left the inbox (a link moved as a link, its target untouched)
        wait_for("inbox emptied", lambda: sorted(os.listdir(d.inbox)) == [".processed"], timeout=30)
        assert Path("/etc/passwd").exists()
        status = json.loads(d.cli("status", "--json").stdout)
        ignored = [e for e in status["inbox"]["entries"] if e["state"] == "ignored"]
        assert [e["name"] for e in ignored] == ["notes.txt"]
        assert status["inbox"]["sources"]["folder"]["healthy"] is True
        m = d.metrics()
        assert m[("nufilt_inbox_entries", (("state", "ignored"),))] == 1
        assert m[("nufilt_inbox_entries", (("state", "error"),))] == 0
        history = d.cli("history", "--limit", "200").stdout
        assert "\x1b" not in history and "esc\\x1b[2Jjunk.safetensors" in history
        assert "odd\\xff\\nname.safetensors" in history
        lines = history.splitlines()  # one line per job: no name or reason breaks one
        assert all(re.match(r"^\s*\d+  ", line) for line in lines[1:1 + n]) and lines[1 + n] == "", history
    finally:
        assert d.stop() == 0


def test_waiting_entries_are_visible_then_merged(tmp_path: Path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    sharded = write_model(finetune(base, 1), tmp_path / "sharded", shards=2)
    d = DaemonProcess(tmp_path / "svc", b).start()
    try:
        slow = d.inbox / "slow"  # copied by hand, no marker: the index names a shard not there yet
        slow.mkdir(parents=True)
        shutil.copy2(sharded / "model.safetensors.index.json", slow)
        shutil.copy2(sharded / "model-00001-of-00002.safetensors", slow)

        def waiting() -> list[dict]:
            data = json.loads(d.cli("status", "--json").stdout)
            return [e for e in data["inbox"]["entries"] if e["state"] == "waiting" and e.get("reason")]

        entry = wait_for("the entry shown as waiting", waiting, timeout=30)[0]
        assert entry["name"] == "slow" and "model-00002-of-00002.safetensors" in entry["reason"]
        assert "inbox       slow: waiting" in d.cli("status").stdout
        assert d.metrics()[("nufilt_inbox_entries", (("state", "waiting"),))] == 1
        shutil.copy2(sharded / "model-00002-of-00002.safetensors", slow)
        wait_for("promoted", lambda: d.in_states("promoted"), timeout=120)
        wait_for("no entry left", lambda: d.metrics()[("nufilt_inbox_entries", (("state", "waiting"),))] == 0,
                 timeout=10)
    finally:
        assert d.stop() == 0


def test_a_store_or_state_dir_that_cannot_be_written_stops_the_start_with_exit_78(tmp_path: Path):
    base = write_model(base_state(), tmp_path / "base")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for key in ("store_dir", "state_dir"):
        where = blocker / key  # a path under a regular file: nothing can be created there (also as root)
        d = DaemonProcess(tmp_path / key, base, **{key: str(where)})
        proc = d.cli("daemon", check=False)
        assert proc.returncode == 78, proc.stderr
        assert str(where) in proc.stderr and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_a_state_disk_that_fails_makes_the_source_unhealthy_and_shows_it(tmp_path: Path):
    base = base_state()
    b = write_model(base, tmp_path / "base")
    t1 = write_model(finetune(base, 1), tmp_path / "t1")
    # intake retries 2, 4, 8, 16 s apart: unhealthy from the 3rd failure (~6 s) to the 5th (~30 s, journaled
    # rejected), a window wide enough for the slow CLI calls below to see it on a loaded machine
    d = DaemonProcess(tmp_path / "svc", b, folder={"retry_seconds": 2.0}).start()
    staged = d.state / "staged"
    try:
        shutil.rmtree(staged, ignore_errors=True)
        staged.write_text("in the way")  # staging fails for real, as on a full or broken state disk
        store_dir_backup = tmp_path / "store-backup"
        os.rename(d.store, store_dir_backup)
        d.store.write_text("not a folder")  # the store is gone: nothing can be written there
        d.drop(t1, "task1")

        def unhealthy() -> dict:
            data = json.loads(d.cli("status", "--json").stdout)
            sick = not data["inbox"]["sources"].get("folder", {}).get("healthy", True)
            return data if sick and data["inbox"]["storage"] else {}

        data = wait_for("the folder source unhealthy", unhealthy, timeout=60)
        entry = next(e for e in data["inbox"]["entries"] if e["name"] == "task1")
        assert entry["state"] == "error" and "not journaled" in entry["reason"]
        assert "store" in data["inbox"]["storage"] and "not writable" in data["inbox"]["storage"]["store"]
        text = d.cli("status").stdout
        assert "source      folder UNHEALTHY" in text and "storage     " in text
        def sick_metrics() -> bool:  # waited for: the supervisor's restart makes the source healthy for a moment
            m = d.metrics()
            return (m[("nufilt_source_healthy", (("source", "folder"),))] == 0
                    and m[("nufilt_inbox_entries", (("state", "error"),))] == 1
                    and m[("nufilt_storage_writable", (("dir", "store"),))] == 0
                    and m[("nufilt_source_errors_total", (("source", "folder"),))] >= 3)

        wait_for("the metrics showing it", sick_metrics, timeout=30)
        wait_for("the supervisor restarting it", lambda: any(
            e["part"] == "source:folder" for e in d.logged("restarting_unhealthy_part")), timeout=30)
        # after the fifth failed intake the entry is journaled as failed (the store's fault), nothing left behind
        job = wait_for("task1 failed", lambda: d.in_states("failed"), timeout=90)[0]
        assert "intake failed 5 times" in job["reason"] and staged.is_file()
        d.store.unlink()
        os.rename(store_dir_backup, d.store)
        wait_for("healthy again", lambda: d.metrics()[("nufilt_source_healthy", (("source", "folder"),))] == 1
                 and d.metrics()[("nufilt_storage_writable", (("dir", "store"),))] == 1, timeout=60)
    finally:
        assert d.stop() == 0
