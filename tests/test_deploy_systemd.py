"""systemd/: the unit passes `systemd-analyze verify` (and its offline security review), the sysusers
file makes the unit's user, the env example holds only real settings that load, and the daemon
talks to systemd the way the unit expects (from its main process, watchdog pings during a merge)."""

from __future__ import annotations

import array
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, wait_for
from deploy_files import SYSTEMD
from nufilt_daemon.config import Settings, load_settings, unknown_env_keys

from nufilt_core.methods import get_method, resolve_settings

UNIT = SYSTEMD / "nufilt.service"
ENV_EXAMPLE = SYSTEMD / "nufilt.env.example"
INSTALLED_EXEC = "/opt/nufilt/.venv/bin/nufilt"
NUFILT = str(Path(sys.executable).parent / "nufilt")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
        else:
            key, _, value = line.partition("=")
            sections[current].append((key, value))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit[section] if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0]


def seconds(text: str) -> float:
    units = {"min": 60, "ms": 0.001, "s": 1, "h": 3600}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def verify(unit_text: str, tmp: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify on a copy; returns its status and every output line about the unit
    (verify exits 0 on unknown keys and bad values, which it only warns about)."""
    from prometheus_server import require_binary

    analyze = require_binary("systemd-analyze", "the Debian package systemd")
    path = tmp / "nufilt.service"
    path.write_text(unit_text)
    proc = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "nufilt.service" in ln]
    return proc.returncode, lines


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    text = UNIT.read_text()
    assert one(parse_unit(text), "ExecStart").startswith(INSTALLED_EXEC + " ")
    # as installed, the only complaint is that /opt/nufilt is not installed here
    rc, lines = verify(text, tmp_path)
    assert all(f"{INSTALLED_EXEC} is not executable" in ln for ln in lines), lines
    # pointed at this checkout's real `nufilt`: nothing to say at all
    rc, lines = verify(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={NUFILT} "), tmp_path)
    assert rc == 0 and lines == []
    # and the check does catch a mistake verify only warns about
    rc, lines = verify(text.replace("ProtectSystem=strict", "ProtectSystem=stricter"), tmp_path)
    assert any("ProtectSystem" in ln or "protect system" in ln for ln in lines), lines


def test_the_check_the_unit_documents_runs_from_a_checkout(tmp_path: Path):
    """The command in the unit's header comment, run as written from the repository root: silent and exit 0."""
    from prometheus_server import require_binary

    require_binary("systemd-analyze", "the Debian package systemd")
    lines = UNIT.read_text().splitlines()
    command = next(ln for ln in lines if "systemd-analyze verify /tmp/nufilt.service" in ln).lstrip("# ")
    command = command.replace("/tmp/nufilt.service", str(tmp_path / "nufilt.service"))
    proc = subprocess.run(["bash", "-c", command], cwd=UNIT.parent.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_unit_security_review_stays_ok(tmp_path: Path):
    from prometheus_server import require_binary

    analyze = require_binary("systemd-analyze", "the Debian package systemd")
    path = tmp_path / "nufilt.service"
    path.write_text(UNIT.read_text().replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={NUFILT} "))
    # exposure 0.0 (locked down) .. 10.0 (unsafe), x10 for --threshold; the unit scores 1.6 "OK"
    proc = subprocess.run([analyze, "security", "--offline=true", "--threshold=25", "--no-pager", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr


def test_unit_is_a_hardened_notify_service_with_gpus_and_fits_the_daemon():
    unit = parse_unit(UNIT.read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "nufilt",
        "StateDirectory": "nufilt", "EnvironmentFile": "/etc/nufilt/nufilt.env", "KillMode": "mixed",
        "OOMPolicy": "continue", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "ProtectHome": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "LockPersonality": "yes", "CapabilityBoundingSet": "", "DevicePolicy": "closed",
        "MemoryDenyWriteExecute": "no",  # PyTorch/CUDA JIT: see the comment in the unit
    }
    assert {k: one(unit, k) for k in expected} == expected
    assert values(unit, "PrivateDevices") == []  # it would hide /dev/nvidia*
    assert "char-nvidia* rw" in values(unit, "DeviceAllow")
    assert "@system-service" in values(unit, "SystemCallFilter")
    assert set(one(unit, "RestrictAddressFamilies").split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    writable = one(unit, "ReadWritePaths").split()
    assert "/var/lib/nufilt" in writable
    # the daemon pings every WatchdogSec/2 from a loop that ticks every loop_interval_seconds
    assert seconds(one(unit, "WatchdogSec")) / 2 >= 5 * Settings.model_fields["loop_interval_seconds"].default


def read_env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active, commented-out) NUFILT_* assignments, values unquoted as systemd does."""
    active, commented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        target = active
        if line.startswith("#NUFILT_"):
            target, line = commented, line[1:]
        if not line.startswith("NUFILT_"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        target[key] = value
    return active, commented


def test_env_example_holds_real_settings_that_load_and_fit_the_unit(monkeypatch: pytest.MonkeyPatch):
    active, commented = read_env_example()
    assert "NUFILT_BASE_MODEL" in active and len(commented) >= 5
    everything = {**active, **commented}
    assert unknown_env_keys(everything) == []
    for k in list(os.environ):
        if k.startswith("NUFILT_"):
            monkeypatch.delenv(k)
    for k, v in everything.items():
        monkeypatch.setenv(k, v)
    s = load_settings()  # types, nested keys, JSON values: as the daemon will read them
    assert s.mlflow.target_model and s.gate.command and s.gate.thresholds["accuracy"].min == 0.8
    resolve_settings(get_method(s.method), {}, s.step_options())  # the method accepts its settings
    monkeypatch.delenv("NUFILT_BASE_MODEL")
    for k in commented:
        monkeypatch.delenv(k)
    s = load_settings()  # the example as shipped, without the optional parts
    assert s.base_model is None and s.mlflow.tracking_uri is None

    unit = parse_unit(UNIT.read_text())
    writable = [p.lstrip("-") for p in one(unit, "ReadWritePaths").split()]
    writable.append("/var/lib/" + one(unit, "StateDirectory"))
    for key in ("NUFILT_WATCH_DIR", "NUFILT_STORE_DIR", "NUFILT_STATE_DIR"):
        assert any(Path(active[key]).is_relative_to(w) for w in writable), f"{key} is read-only in the unit"
    assert not Path(active["NUFILT_BASE_MODEL"]).is_relative_to("/home")  # ProtectHome=yes
    # a stop gives the merge its grace period, and the daemon time to clean up, before SIGKILL
    assert seconds(one(unit, "TimeoutStopSec")) >= float(active["NUFILT_SHUTDOWN_GRACE_SECONDS"]) + 30


def test_sysusers_file_creates_the_units_user(tmp_path: Path):
    from prometheus_server import require_binary

    sysusers = require_binary("systemd-sysusers", "the Debian package systemd")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "nufilt.sysusers")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    users = {ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc/passwd").read_text().splitlines()}
    unit = parse_unit(UNIT.read_text())
    user = users[one(unit, "User")]
    assert user[5] == "/var/lib/" + one(unit, "StateDirectory") and user[6] == "/usr/sbin/nologin"
    assert one(unit, "Group") in (tmp_path / "etc/group").read_text()


@pytest.mark.slow
def test_daemon_notifies_only_from_its_main_process_and_pings_the_watchdog_during_a_merge(
        tiny: dict[str, Path], tmp_path: Path):
    """What NotifyAccess=main and WatchdogSec rely on: every message comes from the main PID
    (systemd checks the sender's credentials), and pings never pause while a child merges."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(0.2)
    received: list[tuple[float, int, str]] = []  # (time, sender pid, message)
    done = threading.Event()

    def read() -> None:
        creds = array.array("i", [0, 0, 0])
        while not done.is_set():
            try:
                msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds.itemsize * 3))
            except TimeoutError:
                continue
            pid = next(array.array("i", data)[0] for level, kind, data in anc
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            received.append((time.time(), pid, msg.decode()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    watchdog_usec = 3_000_000  # the unit's WatchdogSec=60, scaled down: a ping every 1.5 s
    d = DaemonProcess(tmp_path / "svc", tiny["base"])
    try:
        d.start(extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(watchdog_usec)})
        d.drop(tiny["t1"], "task1")
        wait_for("a merge running", lambda: d.in_states("merging", "validating", "promoted"), timeout=60)
        wait_for("the promotion", lambda: d.in_states("promoted"), timeout=120)
        finished = d.jobs()[0]["finished_at"]
        wait_for("a ping after it", lambda: [t for t, _, m in list(received) if "WATCHDOG=1" in m and t > finished],
                 timeout=30)
    finally:
        assert d.stop() == 0
        done.set()
        reader.join()
        sock.close()
    assert d.proc is not None
    assert received and {pid for _, pid, _ in received} == {d.proc.pid}
    assert "READY=1" in received[0][2]
    pings = [t for t, _, m in received if "WATCHDOG=1" in m]
    job = d.jobs()[0]
    assert pings[0] < job["started_at"] and pings[-1] > job["finished_at"]  # the pings span the merge
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < watchdog_usec / 1e6, gaps
