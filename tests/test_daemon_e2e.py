"""End to end: the real `nufilt daemon` as a subprocess on a temporary store, real files dropped by
rename, real /metrics over HTTP, real kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from daemon_harness import DaemonProcess, wait_for
from models import base_state, finetune, write_model
from nufilt_daemon.intake import content_hash

from nufilt_core.lineage import LineageRecord

pytestmark = pytest.mark.slow

PROMOTED = 'nufilt_merges_total', (("outcome", "promoted"),)
REJECTED = 'nufilt_merges_total', (("outcome", "rejected"),)


def drop_and_wait_journaled(d: DaemonProcess, src: Path, name: str) -> dict:
    before = len(d.jobs())
    d.drop(src, name)
    wait_for(f"{name} journaled", lambda: len(d.jobs()) > before, timeout=60)
    return d.jobs()[before]


def test_three_drops_become_versions_and_bad_or_duplicate_drops_do_not(tiny: dict[str, Path], tmp_path: Path):
    d = DaemonProcess(tmp_path / "svc", tiny["base"]).start()
    try:
        m = d.metrics()  # label sets exist before the first event
        assert m[PROMOTED] == 0 and m[REJECTED] == 0
        assert m[("nufilt_checkpoints_detected_total", (("source", "folder"),))] == 0
        assert m[("nufilt_production_version", ())] == 0

        for i in (1, 2, 3):
            drop_and_wait_journaled(d, tiny[f"t{i}"], f"task{i}")
        wait_for("three promotions", lambda: len(d.in_states("promoted")) == 3, timeout=150)

        jobs = d.jobs()
        assert [(j["id"], j["version"], j["step"]) for j in jobs] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
        assert os.readlink(d.store / "production") == "versions/v000003"
        assert sorted(p.name for p in (d.store / "versions").iterdir()) == ["v000001", "v000002", "v000003"]
        record = LineageRecord.read(d.store / "production")
        assert record.step == 3
        assert [c.sha256 for c in record.checkpoints] == [content_hash(tiny[f"t{i}"]) for i in (1, 2, 3)]
        assert content_hash(d.store / "production") == record.model_sha256  # complete, untouched weights
        report = json.loads((d.store / "versions/v000003/validation.json").read_text())
        assert report["decision"] == "accepted" and report["parent_version"] == 2 and report["job_id"] == 3
        assert 0 <= report["scores"]["stability"] and report["scores"]["matrices"] == 10
        # processed inbox entries are moved aside; the staged copies are gone once merged
        assert sorted(p.name.split("-", 1)[1] for p in (d.inbox / ".processed").iterdir()) == ["task1", "task2",
                                                                                               "task3"]
        # the worker drops a staged copy just after committing the final state: wait, do not race it
        wait_for("staged copies removed", lambda: list((d.state / "staged").iterdir()) == [], timeout=30)

        # counters move right after the journal commits, gauges at the next supervisor tick
        m = wait_for("metrics of three merges", lambda: (lambda m: m[PROMOTED] == 3
                     and m[("nufilt_pending_checkpoints", ())] == 0 and m)(d.metrics()), timeout=10)
        assert m[("nufilt_merge_duration_seconds_count", ())] == 3
        assert m[("nufilt_validation_duration_seconds_count", ())] == 3
        assert m[("nufilt_checkpoints_detected_total", (("source", "folder"),))] == 3
        assert m[("nufilt_merge_step", ())] == 3 and m[("nufilt_production_version", ())] == 3
        assert m[("nufilt_last_promotion_timestamp_seconds", ())] > 0
        assert ("nufilt_validation_score", (("metric", "stability"),)) in m

        # the same content again, under another name: recorded, not merged
        dup = drop_and_wait_journaled(d, tiny["t2"], "task2-again")
        assert dup["state"] == "duplicate" and dup["duplicate_of"] == 2

        # a truncated file in a folder marked complete: rejected on arrival, naming the file
        corrupt = tmp_path / "corrupt"
        write_model(finetune(base_state(), 7), corrupt)
        data = (corrupt / "model.safetensors").read_bytes()
        (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
        (corrupt / "_COMPLETE").touch()
        bad = drop_and_wait_journaled(d, corrupt, "corrupt")
        assert bad["state"] == "rejected" and "model.safetensors" in bad["reason"]
        assert "truncated" in bad["reason"] or "does not fit" in bad["reason"]

        # a checkpoint of another shape: refused by the merge's pre-flight, production stays
        state = finetune(base_state(), 8)
        state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(16, 8)
        mismatched = write_model(state, tmp_path / "mismatched")
        job = drop_and_wait_journaled(d, mismatched, "mismatched")
        final = wait_for("mismatch decided", lambda: [j for j in d.jobs() if j["id"] == job["id"]
                                                       and j["state"] in ("rejected", "failed")], timeout=90)[0]
        assert final["state"] == "rejected"
        assert "encoder.layer.0.attention.self.query.weight" in final["reason"] and "shape" in final["reason"]
        quarantined = json.loads((d.store / "quarantine" / f"job-{job['id']:06d}" / "validation.json").read_text())
        assert quarantined["decision"] == "rejected" and quarantined["reasons"] == [final["reason"]]
        assert os.readlink(d.store / "production") == "versions/v000003"
        wait_for("two rejections counted", lambda: d.metrics()[REJECTED] == 2, timeout=10)
        assert d.metrics()[PROMOTED] == 3

        status = json.loads(d.cli("status", "--json").stdout)
        assert status["production"]["version"] == 3 and status["production"]["step"] == 3
        assert status["production"]["profile"] == "paper"  # the harness sets it in method_settings
        assert status["next_merge"]["options"] == {"profile": "paper", "iters": 3}
        assert status["next_merge"]["settings"]["iters"] == 3
        assert status["next_merge"]["settings"]["profile"] == "paper"  # inherited: the lineage's own
        assert status["next_merge"]["source"] == "method_settings, at every step"
        assert status["queue"] == {"queued": 0, "merging": 0, "validating": 0}
        assert status["last"]["state"] == "rejected" and status["daemon"]["running"] is True
        assert status["totals"]["duplicate"] == 1
        # one time format (ISO 8601) and absolute paths; checkpoints named as submitted, not by staged copies
        assert status["daemon"]["started_at"].endswith("+00:00") and Path(status["production"]["path"]).is_absolute()
        assert [c["job"] for c in status["production"]["checkpoints"]] == [1, 2, 3]
        assert all(c["reference"] and c["source"] == "folder" for c in status["production"]["checkpoints"])
    finally:
        assert d.stop() == 0
    assert d.logged("daemon_stopped")
    summaries = d.logged("merge_finished")  # one summary event per merge, with its context
    assert [(e["job"], e["outcome"]) for e in summaries] == [(1, "promoted"), (2, "promoted"), (3, "promoted"),
                                                              (6, "rejected")]
    assert all(e["timestamp"].endswith("Z") and e["level"] == "info" for e in summaries)


def test_kill_9_during_a_merge_then_restart_merges_each_checkpoint_exactly_once(tiny: dict[str, Path],
                                                                                 tmp_path: Path):
    # merges slow enough (seconds, not the tiny model's milliseconds) that the kill lands inside one
    d = DaemonProcess(tmp_path / "svc", tiny["base"], method_settings={"iters": 3000}).start()
    for i in (1, 2, 3):
        drop_and_wait_journaled(d, tiny[f"t{i}"], f"task{i}")
    wait_for("job 2 merging", lambda: any(j["id"] == 2 and j["state"] == "merging" for j in d.jobs()), timeout=120)
    child = wait_for("merge process of job 2", lambda: [e["pid"] for e in d.logged("merge_process_started")
                                                        if e["job"] == 2], timeout=30)[0]
    d.kill9()
    # the merge child dies with the daemon (PR_SET_PDEATHSIG): nothing keeps writing into the store
    wait_for("merge child gone", lambda: not Path(f"/proc/{child}").exists() or
             Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", timeout=15)
    assert any(j["state"] in ("merging", "validating") for j in d.jobs())

    d.start()  # same store and state dirs
    try:
        wait_for("three promotions", lambda: len(d.in_states("promoted")) == 3, timeout=150)
        jobs = d.jobs()
        assert [(j["id"], j["state"], j["version"]) for j in jobs] == [(1, "promoted", 1), (2, "promoted", 2),
                                                                     (3, "promoted", 3)]
        assert jobs[1]["attempts"] == 2 and jobs[0]["attempts"] == 1 and jobs[2]["attempts"] == 1
        assert [e["job"] for e in d.logged("job_requeued_after_restart")] == [2]
        record = LineageRecord.read(d.store / "production")
        shas = [c.sha256 for c in record.checkpoints]
        assert shas == [content_hash(tiny[f"t{i}"]) for i in (1, 2, 3)]  # each exactly once, in order
        assert content_hash(d.store / "production") == record.model_sha256
        assert sorted(p.name for p in (d.store / "versions").iterdir()) == ["v000001", "v000002", "v000003"]
        assert list((d.store / "candidates").iterdir()) == []
        # the worker drops a staged copy just after committing the final state: wait, do not race it
        wait_for("staged copies removed", lambda: list((d.state / "staged").iterdir()) == [], timeout=30)
    finally:
        assert d.stop() == 0

    # SIGTERM during a merge with no grace: the merge is abandoned safely and the job waits, intact
    d = DaemonProcess(tmp_path / "svc", tiny["base"], shutdown_grace_seconds=0,
                      method_settings={"iters": 20000}).start()
    job = drop_and_wait_journaled(d, tiny["t1"], "task1-as-new")
    assert job["state"] == "duplicate"  # (the daemon remembers content across restarts)
    fresh = write_model(finetune(base_state(), 4), tmp_path / "t4")
    job = drop_and_wait_journaled(d, fresh, "task4")
    wait_for("job merging", lambda: d.in_states("merging"), timeout=60)
    assert d.stop() == 0
    after = next(j for j in d.jobs() if j["id"] == job["id"])
    assert (after["state"], after["attempts"]) == ("queued", 0) and "abandoned" in after["reason"]
    assert content_hash(Path(after["staged_path"])) == after["sha256"]  # its private copy is kept
    assert list((d.store / "candidates").iterdir()) == []
    assert os.readlink(d.store / "production") == "versions/v000003"


def test_rollback_then_a_new_merge_continues_from_the_rolled_back_version(tiny: dict[str, Path], tmp_path: Path):
    d = DaemonProcess(tmp_path / "svc", tiny["base"]).start()
    try:
        for i in (1, 2):
            drop_and_wait_journaled(d, tiny[f"t{i}"], f"task{i}")
        wait_for("two promotions", lambda: len(d.in_states("promoted")) == 2, timeout=120)

        out = d.cli("rollback", "--reason", "task2 regressed").stdout
        assert "v000002 → v000001" in out
        assert os.readlink(d.store / "production") == "versions/v000001"
        wait_for("rollback metric", lambda: d.metrics()[("nufilt_rollbacks_total", ())] == 1, timeout=10)
        assert d.metrics()[("nufilt_production_version", ())] == 1

        drop_and_wait_journaled(d, tiny["t3"], "task3")
        wait_for("third promotion", lambda: len(d.in_states("promoted")) == 3, timeout=120)
        assert os.readlink(d.store / "production") == "versions/v000003"
        record = LineageRecord.read(d.store / "production")
        assert record.step == 2  # continued from v1, not from the rolled-back v2
        assert [c.sha256 for c in record.checkpoints] == [content_hash(tiny["t1"]), content_hash(tiny["t3"])]
        assert json.loads((d.store / "versions/v000003/validation.json").read_text())["parent_version"] == 1

        # rollback follows the parent link: from v3 back to v1, not to the abandoned v2
        assert "v000003 → v000001" in d.cli("rollback").stdout
        history = json.loads(d.cli("history", "--json").stdout)
        kinds = [(c["kind"], c["from_version"], c["to_version"]) for c in history["production_changes"]]
        assert kinds[:3] == [("rollback", 3, 1), ("promote", 1, 3), ("rollback", 2, 1)]
        assert history["production_changes"][2]["reason"] == "task2 regressed"
        # and from v1, the first version, there is nothing to go back to
        fail = d.cli("rollback", check=False)
        assert fail.returncode == 1 and "first version" in fail.stderr
    finally:
        assert d.stop() == 0


def test_a_production_link_changed_by_hand_is_reconciled_with_the_journal(tiny: dict[str, Path], tmp_path: Path):
    """Deleted: put back before the next merge (which must not start again from the base). Moved: followed and
    journaled. Deleted with its version gone too: merges wait, and status says why."""
    more = {k: write_model(finetune(base_state(), k), tmp_path / f"t{k}") for k in (4, 5)}
    d = DaemonProcess(tmp_path / "svc", tiny["base"]).start()
    link = d.store / "production"
    try:
        for i in (1, 2):
            drop_and_wait_journaled(d, tiny[f"t{i}"], f"task{i}")
        wait_for("two promotions", lambda: len(d.in_states("promoted")) == 2, timeout=120)

        link.unlink()
        drop_and_wait_journaled(d, tiny["t3"], "task3")
        wait_for("third promotion", lambda: len(d.in_states("promoted")) == 3, timeout=120)
        record = LineageRecord.read(link)
        assert record.step == 3 and json.loads((link / "validation.json").read_text())["parent_version"] == 2
        assert "missing; restored to v000002" in d.logged("production_reconciled")[0]["what"]

        os.symlink("versions/v000001", d.store / "by-hand")
        os.replace(d.store / "by-hand", link)  # an operator's `ln -sfn versions/v000001 production`
        drop_and_wait_journaled(d, more[4], "task4")
        wait_for("fourth promotion", lambda: len(d.in_states("promoted")) == 4, timeout=120)
        assert LineageRecord.read(link).step == 2  # continued from v1, the production found
        history = json.loads(d.cli("history", "--json").stdout)["production_changes"]
        assert [(c["kind"], c["from_version"], c["to_version"]) for c in history[:2]] == [
            ("promote", 1, 4), ("reconcile", 3, 1)]
        assert d.metrics()[("nufilt_production_reconciled_total", ())] == 2

        link.unlink()
        shutil.rmtree(d.store / "versions/v000004")
        drop_and_wait_journaled(d, more[5], "task5")
        status = wait_for("status names the problem", lambda: (lambda s: "v000004" in s and s)(d.cli("status").stdout),
                          timeout=30)
        assert "production" in status and d.in_states("queued")  # waiting, not merged from the base
        assert d.logged("production_unknown")
        os.symlink("versions/v000003", link)  # the operator points it at a version
        wait_for("fifth promotion", lambda: len(d.in_states("promoted")) == 5, timeout=120)
        assert LineageRecord.read(link).step == 4
    finally:
        assert d.stop() == 0


def test_a_corrupted_production_fails_the_merge_without_blaming_the_checkpoint(tiny: dict[str, Path],
                                                                              tmp_path: Path):
    """The production version's weights no longer match their record: the daemon's fault, so the job fails (not
    rejected, which would make the same checkpoint a duplicate for ever) and merges once production is repaired."""
    d = DaemonProcess(tmp_path / "svc", tiny["base"]).start()
    try:
        drop_and_wait_journaled(d, tiny["t1"], "task1")
        wait_for("v1", lambda: d.in_states("promoted"), timeout=120)
        weights = d.store / "versions/v000001/model.safetensors"
        good = weights.read_bytes()
        broken = bytearray(good)
        broken[-3] ^= 0x01  # one bit of the last tensor's data
        weights.write_bytes(bytes(broken))

        job = drop_and_wait_journaled(d, tiny["t2"], "task2")
        failed = wait_for("task2 settled", lambda: [j for j in d.jobs() if j["id"] == job["id"]
                                                    and j["state"] in ("failed", "rejected", "promoted")], timeout=120)
        assert failed[0]["state"] == "failed" and "no longer match their lineage record" in failed[0]["reason"]

        weights.write_bytes(good)  # repaired: the same checkpoint is merged when it is dropped again
        again = drop_and_wait_journaled(d, tiny["t2"], "task2-again")
        assert again["state"] != "duplicate", again
        wait_for("task2 promoted", lambda: len(d.in_states("promoted")) == 2, timeout=120)
    finally:
        assert d.stop() == 0


def test_config_errors_are_reported_with_the_key(tiny: dict[str, Path], tmp_path: Path):
    d = DaemonProcess(tmp_path / "svc", tiny["base"], folder={"setle_seconds": 1})
    proc = d.cli("daemon", check=False)
    assert proc.returncode == 78  # EX_CONFIG: systemd does not restart on it
    assert "folder.setle_seconds: unknown key" in proc.stderr and str(d.config) in proc.stderr
    assert not (d.state / "journal.db").exists()  # nothing started

    ok = DaemonProcess(tmp_path / "ok", tiny["base"], mlflow={"webhook_secret": "s3cret", "tracking_uri": "x",
                                                              "target_model": "m"})
    shown = ok.cli("daemon", "--check").stdout
    assert "s3cret" not in shown and json.loads(shown)["mlflow"]["webhook_secret"] == "**********"

    # --check opens the base as the daemon would: a missing one is an error, not "ok"
    missing = DaemonProcess(tmp_path / "missing", tmp_path / "no-such-base")
    proc = missing.cli("daemon", "--check", check=False)
    assert proc.returncode != 0 and "no-such-base" in proc.stderr and "does not exist" in proc.stderr

    # a journal that is not a database: exit 78 (systemd does not restart it every 10 s) with one line saying what
    # to do, no traceback
    broken = DaemonProcess(tmp_path / "broken", tiny["base"])
    broken.state.mkdir(parents=True)
    (broken.state / "journal.db").write_bytes(b"this is not SQLite" * 100)
    proc = broken.cli("daemon", check=False)
    assert proc.returncode == 78 and "journal.db: not a readable journal" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "move it aside" in proc.stderr


def test_systemd_notify_and_single_instance(tiny: dict[str, Path], tmp_path: Path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:  # as systemd does: always reading
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    d = DaemonProcess(tmp_path / "svc", tiny["base"])
    try:
        d.start(extra_env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        wait_for("READY=1", lambda: any("READY=1" in m for m in messages), timeout=10)
        wait_for("two WATCHDOG=1", lambda: sum("WATCHDOG=1" in m for m in messages) >= 2, timeout=10)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=production none" in ready

        d.proc.send_signal(signal.SIGHUP)  # a terminal closing, `kill -HUP`: said in the log, the daemon goes on
        wait_for("sighup_ignored", lambda: d.logged("sighup_ignored"), timeout=10)
        time.sleep(0.5)
        assert d.proc.poll() is None
        # what it writes is its group's at most (umask 027, as under systemd), whatever the caller's umask
        assert (d.state / "journal.db").stat().st_mode & 0o007 == 0

        second = DaemonProcess(tmp_path / "svc", tiny["base"])  # same state dir
        proc = second.cli("daemon", check=False)
        assert proc.returncode == 1 and "another nufilt daemon" in proc.stderr
        # its own state dir and inbox, but the same store: refused too, naming the store and the holder
        third = DaemonProcess(tmp_path / "other", tiny["base"], store_dir=str(d.store))
        proc = third.cli("daemon", check=False)
        assert proc.returncode == 1 and f"{d.store}: another nufilt daemon (pid {d.proc.pid}) uses this store" \
            in proc.stderr, proc.stderr
        assert not (third.state / "journal.db").exists()  # refused before it journaled anything
    finally:
        assert d.stop() == 0
        wait_for("STOPPING=1", lambda: any("STOPPING=1" in m for m in messages), timeout=10)
        done.set()
        reader.join()
        sock.close()
    with sqlite3.connect(d.state / "journal.db") as con:  # the journal is intact and empty
        assert con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_submit_wait_returns_with_the_outcome(tiny: dict[str, Path], tmp_path: Path):
    """The quick start's `nufilt submit --wait`: promoted (exit 0), duplicate of a promoted one (0), rejected (1)."""
    d = DaemonProcess(tmp_path / "svc", tiny["base"])
    # submitted before the daemon ever ran: --wait waits for the journal to appear
    early = d.cli("submit", str(tiny["t1"]), "--name", "t1", "--wait", "--timeout", "0.5", check=False)
    assert early.returncode == 1 and "still not journaled after 0.5 s" in early.stderr
    d.start()
    try:
        wait_for("t1 promoted", lambda: d.in_states("promoted"), timeout=60)
        second = d.cli("submit", str(tiny["t2"]), "--name", "t2", "--wait", "--timeout", "120")
        assert "promoted as v000002 (step 2) in " in second.stdout
        again = d.cli("submit", str(tiny["t2"]), "--name", "t2-again", "--wait", "--timeout", "120")
        assert again.returncode == 0 and "duplicate of job 2 (promoted)" in again.stdout
        other = write_model(base_state(seed=7), tmp_path / "other-base")  # same names and shapes, unrelated
        bad = d.cli("submit", str(other), "--name", "other", "--wait", "--timeout", "120", check=False)
        assert bad.returncode == 1 and "rejected after" in bad.stdout and "implausibly far from the base" in bad.stdout
    finally:
        assert d.stop() == 0
