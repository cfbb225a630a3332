"""The inbox shared between users, as deploy/README.md sets it up: a daemon user and a trainer user in
one group, an inbox `2770`, checkpoints saved `0600` by the trainer. Real users made with useradd, so
this runs only as root (CI and the deploy host); elsewhere it is skipped."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="creating real users needs root and useradd")]


class Users:
    """A group, the daemon's user (primary group: the group) and a trainer (own group + the group)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.group, self.daemon, self.trainer = f"nfg{tag}", f"nfd{tag}", f"nft{tag}"

    def create(self) -> None:
        subprocess.run(["groupadd", "--system", self.group], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--gid", self.group, self.daemon], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group", "--groups", self.group, self.trainer], check=True)

    def remove(self) -> None:
        for user in (self.trainer, self.daemon):
            subprocess.run(["userdel", user], check=False, capture_output=True)
        subprocess.run(["groupdel", self.group], check=False, capture_output=True)

    def ids(self, user: str) -> dict[str, object]:
        """Popen arguments that run a child as `user` with exactly its own groups."""
        pw = pwd.getpwnam(user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}


def python_for(root: Path) -> str:
    """A Python other users can run with this environment's packages. An interpreter installed under
    root's 0700 home (pyenv) is out of their reach: then the system's interpreter of the same minor
    version, in a bare venv whose .pth adds this environment's site-packages."""
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/local/bin:/usr/bin")
    if system is None or Path(system).resolve() == Path(sys.executable).resolve():
        return sys.executable
    venv = root / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([str(venv / "bin" / "python"), "-c", ask], check=True, capture_output=True,
                          text=True).stdout.strip()
    (Path(site) / "outer.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    return str(venv / "bin" / "python")


@pytest.fixture
def users() -> Iterator[Users]:
    u = Users()
    try:
        u.create()
        yield u
    finally:
        u.remove()


def nufilt(python: str, *args: str) -> list[str]:
    return [python, "-c", "import sys; from nufilt_daemon.cli import main; sys.exit(main())", *args]


def as_user(python: str, users: Users, user: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run(nufilt(python, *args), capture_output=True, text=True, timeout=180,
                          env=env, cwd=home, umask=0o077, **users.ids(user))  # type: ignore[call-overload]


def test_a_trainer_in_the_group_submits_and_the_daemon_user_merges(tiny: dict[str, Path], users: Users):
    root = Path(tempfile.mkdtemp(prefix="nufilt-shared-"))  # not under pytest's 0700 tmp: other users walk it
    try:
        root.chmod(0o755)
        python = python_for(root)
        reach = subprocess.run([python, "-c", "import torch, nufilt_daemon.cli"], capture_output=True, text=True,
                               cwd=root, **users.ids(users.daemon))  # type: ignore[call-overload]
        if reach.returncode != 0:
            pytest.skip(f"this environment's packages are out of other users' reach: {reach.stderr[-300:]}")
        base = root / "base"
        shutil.copytree(tiny["base"], base)
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        svc = root / "svc"  # /var/lib/nufilt: the daemon's, the group may enter
        d = DaemonProcess(svc, base)
        shutil.chown(svc, users.daemon, users.group)
        svc.chmod(0o750)
        d.config.chmod(0o644)
        d.inbox.mkdir()
        shutil.chown(d.inbox, users.daemon, users.group)
        d.inbox.chmod(0o2770)  # as the deploy guide's `install -d -m 2770`
        homes = {u: root / f"home-{u}" for u in (users.daemon, users.trainer)}
        for user, home in homes.items():
            home.mkdir(mode=0o700)
            shutil.chown(home, user, user if user == users.trainer else users.group)
        # the trainer's checkpoints, private as safetensors saves them (0600 files in a 0700 folder)
        mine = homes[users.trainer]
        for name in ("t1", "t2"):
            shutil.copytree(tiny[name], mine / name)
            for p in [mine / name, *(mine / name).rglob("*")]:
                shutil.chown(p, users.trainer, users.trainer)
                p.chmod(0o700 if p.is_dir() else 0o600)

        d.proc = subprocess.Popen(nufilt(python, "daemon", "--config", str(d.config)),
                                  stdout=d.log_path.open("ab"), stderr=subprocess.STDOUT,
                                  env={**d.env(), "HOME": str(homes[users.daemon])}, umask=0o027,
                                  **users.ids(users.daemon))  # type: ignore[call-overload]
        try:
            d.wait_ready()
            first = as_user(python, users, users.trainer, mine, "submit", str(mine / "t1"), "--name", "t1", "--wait",
                            "--timeout", "120", "--config", str(d.config))
            assert first.returncode == 0, first.stderr + first.stdout
            assert "promoted as v000001" in first.stdout
            # a folder moved in by hand without `chmod -R g+rwX`: the daemon cannot read it, and says so
            moved = d.inbox / "t2"
            subprocess.run(["mv", str(mine / "t2"), str(moved)], check=True, **users.ids(users.trainer))
            wait_for("the unreadable drop decided", lambda: d.logged("checkpoint_unreadable"), timeout=60)
            said = d.logged("checkpoint_unreadable")[0]["reason"]
            assert said.startswith(f"{moved}: cannot be listed: Permission denied (for user {users.daemon}:"), said
            assert "chmod -R g+rX" in said
            # the daemon may not move a folder it cannot write into .processed: it says so once and
            # remembers the entry instead of journaling it again at every rescan
            wait_for("the stranded entry logged", lambda: d.logged("inbox_entry_not_moved"), timeout=30)
            time.sleep(2.5)  # two rescans (rescan_interval_seconds = 1)
            assert len([j for j in d.jobs() if Path(j["reference"]).name == "t2"]) == 1
            assert len(d.logged("checkpoint_unreadable")) == 1
        finally:
            assert d.stop() == 0, d.log_path.read_text()

        # what the daemon wrote: its own, the group may read, others may not (UMask=0027)
        version = (d.store / "production").resolve()
        for p in [version, *version.rglob("*")]:
            st = p.stat()
            assert pwd.getpwuid(st.st_uid).pw_name == users.daemon, p
            assert not st.st_mode & (stat.S_IROTH | stat.S_IWOTH), f"{p} is readable by others"
            assert st.st_mode & stat.S_IRGRP, f"{p} is not readable by the group"
        # the trainer, in the group, can load production; the copy submit made stayed out of the trainer's files
        loaded = subprocess.run(["cat", str(version / "model.safetensors")], capture_output=True,
                                **users.ids(users.trainer))
        assert loaded.returncode == 0 and len(loaded.stdout) > 0
        assert (mine / "t1" / "model.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        shutil.rmtree(root, ignore_errors=True)
