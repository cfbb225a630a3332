"""scripts/quickstart.sh and the README's quick start, run for real: a signal to the script's own PID
leaves no daemon or MLflow process behind (the script runs the daemon in the background and waits
for it), and the README's second quick-start block, read from README.md at test time, runs line by
line against the script's daemon and MLflow server, each command exiting 0 and printing what its
comment quotes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemon_harness import wait_for
from mlflow_server import free_port
from models import base_state, write_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the .venv the script sets up (and finds already there)
# the ports the README's commands name, which the test moves to free ones (MLFLOW_PORT, NUFILT_METRICS_PORT)
README_METRICS, README_MLFLOW = "127.0.0.1:9180", "127.0.0.1:5000"


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment contains `text` (the test's own folder: the daemon and MLflow
    name it, and the processes they start, such as MLflow's uvicorn, inherit the script's NUFILT_* variables)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                seen = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
            except OSError:
                continue
            if text in seen.replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(proc.name))
    return out


def kill_groups(pids: list[int]) -> None:
    """SIGKILL the process groups of `pids` (MLflow runs in a process group of its own), never this test's own."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def quickstart_env(base: Path, root: Path, metrics_port: int, mlflow_port: int) -> dict[str, str]:
    """The script's documented knobs: the base model, the three folders under `root`, the two ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}
    env.update(NUFILT_BASE_MODEL=str(base), NUFILT_WATCH_DIR=str(root / "nufilt-inbox"),
               NUFILT_STORE_DIR=str(root / "nufilt-store"), NUFILT_STATE_DIR=str(root / "nufilt-state"),
               NUFILT_METRICS_PORT=str(metrics_port), MLFLOW_PORT=str(mlflow_port))
    return env


@contextmanager
def quickstart(env: dict[str, str], watched: Path, mlflow: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """scripts/quickstart.sh running, once its daemon serves metrics; afterwards nothing that names
    `watched` (the daemon, MLflow) is left running, whatever happened."""
    args = ["bash", str(ROOT / "scripts" / "quickstart.sh"), *([] if mlflow else ["--no-mlflow"])]
    # a process group of its own, so that whatever happens the test can clean up the whole group at the end
    script = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        def ready() -> bool:
            assert script.poll() is None, script.stderr.read().decode()[-2000:] if script.stderr else ""
            try:
                url = f"http://127.0.0.1:{env['NUFILT_METRICS_PORT']}/metrics"
                return urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                return False

        wait_for("the daemon serving metrics", ready, timeout=300, interval=0.5)
        yield script
        if script.poll() is None:  # stopped as a user does, with Ctrl-C: nothing it started may be left
            script.send_signal(signal.SIGINT)
            assert script.wait(timeout=120) == 128 + signal.SIGINT
        wait_for("nothing the quick start started left", lambda: processes_mentioning(str(watched)) == [],
                 timeout=30)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        kill_groups(processes_mentioning(str(watched)))


@pytest.mark.parametrize("sig,mlflow", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_signal_to_the_script_stops_the_daemon_and_mlflow(tmp_path: Path, sig: signal.Signals, mlflow: bool):
    base = write_model(base_state(), tmp_path / "base")
    env = quickstart_env(base, tmp_path, free_port(), free_port())
    with quickstart(env, tmp_path, mlflow) as script:
        started = processes_mentioning(str(tmp_path))
        assert len(started) >= (2 if mlflow else 1), started  # the daemon (and MLflow)
        script.send_signal(sig)  # to the script's PID only, not its group
        assert script.wait(timeout=120) == 128 + sig
        wait_for("no daemon or MLflow process left", lambda: processes_mentioning(str(tmp_path)) == [], timeout=30)


def readme_quick_start_commands() -> list[str]:
    """The lines of the second ```sh block of README.md's "## Quick start" section, as written there."""
    text = (ROOT / "README.md").read_text()
    assert "\n## Quick start\n" in text, "README.md has no '## Quick start' section"
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) >= 2, "the quick start has no second ```sh block"
    return [line for line in blocks[1].splitlines() if line.strip()]


def squeeze(text: str) -> str:
    """Without whitespace: the README aligns and abbreviates, the CLI pads, MLflow indents its JSON."""
    return "".join(text.split())


def promises(command: str) -> list[str]:
    """What a line's comment quotes as its output ("..." or `...` when the output has double quotes),
    in pieces: the text between the placeholders (N, N s, ...), squeezed."""
    comment = command.split("  # ", 1)[1] if "  # " in command else ""
    pieces = []
    for double, backticked in re.findall(r'"([^"]*)"|`([^`]*)`', comment):
        pieces += [squeeze(p) for p in re.split(r"\.\.\.|\bN s\b|\bN\b", double or backticked) if p.strip()]
    return pieces


def test_the_readme_quick_start_runs_as_written(tmp_path: Path):
    """A user's checkout, in miniature: the same .venv, the demo models `nufilt demo` writes (what the
    script itself runs without NUFILT_BASE_MODEL), and the folders the script defaults to, so that
    the README's relative paths mean here what they mean in the repository."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(VENV)
    subprocess.run([str(VENV / "bin" / "nufilt"), "demo", str(checkout / "nufilt-demo")], check=True,
                   capture_output=True, timeout=300)
    metrics_port, mlflow_port = free_port(), free_port()
    env = quickstart_env(checkout / "nufilt-demo" / "base", checkout, metrics_port, mlflow_port)
    commands = readme_quick_start_commands()
    block = "\n".join(commands)
    assert README_METRICS in block and README_MLFLOW in block, "the README's ports changed: update the test"
    moved = {README_METRICS: f"127.0.0.1:{metrics_port}", README_MLFLOW: f"127.0.0.1:{mlflow_port}"}
    user_env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}  # a fresh shell

    with quickstart(env, tmp_path):
        for command in commands:
            for theirs, ours in moved.items():
                command = command.replace(theirs, ours)  # the only change to what the README says
            proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=user_env, capture_output=True,
                                  text=True, timeout=600)
            out = squeeze(proc.stdout)
            assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            assert promises(command) or "#" not in command, f"{command}: its comment quotes nothing it prints"
            for piece in promises(command):
                assert piece in out, f"{command}\nprinted no {piece!r}:\n{proc.stdout}\n{proc.stderr}"
