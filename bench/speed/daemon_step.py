"""One daemon step against `nufilt merge` alone, side by side on the same inputs: time and bytes read.

Inputs: a base θ0 and fine-tunes of a shape from make_models.py (written once under bench/cache/, or
--models-root). Then, in a temporary folder:

  daemon  `nufilt daemon --config FILE` as a subprocess (folder source, settle_seconds 0.2 by default,
          MLflow off, threads 1, device cpu, the default method). Step 1: checkpoint 1 is copied into a
          sibling of the inbox and renamed into it; wait for production v1. Step 2, measured: checkpoint 2
          the same way; wall time from the rename to STORE/production moving (its symlink read every
          50 ms), and the bytes the daemon read in that interval: the delta of rchar and read_bytes in
          /proc/<daemon pid>/io, read once its merge child has been reaped (Linux adds a reaped child's
          counts to its parent's).
  merge   `nufilt merge --threads 1` on the same inputs of step 2 (base, previous = the daemon's v1,
          new = a fresh copy of checkpoint 2): wall time, and bytes read as the delta of this script's
          own /proc/self/io around the subprocess (the reaped child's counts land in ours).

--cold: the inputs (base, previous, the dropped copy) are evicted from the page cache
(their weight files: fsync, then posix_fadvise DONTNEED) right before each timed interval, for both, so that
`read_bytes` counts what a step really fetches from storage (with a warm cache it is ~0); `rchar`
counts every byte through a read call, page cache included.

Targets: drop→production ≤ 1.15 × `nufilt merge`; bytes the daemon read ≤ 1.3 × the
weight files of base + previous + new. With --repeat N (checkpoints 2 … N+1, production rolled back
to v1 between repeats with `nufilt rollback`, daemon and merge alternating in order) medians count.
Exit status 1 when a target is missed.

    .venv/bin/python bench/speed/daemon_step.py --shape vit-tiny        # a quick check, ~15 s
    nice -n 10 .venv/bin/python bench/speed/daemon_step.py              # ViT-B/32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from make_models import CACHE, SHAPES, ensure_models
from measure import child_env, evict
from nufilt_step import folder_bytes, gb, verdict
from threads import NUFILT, merge_seconds

TARGET_TIME_RATIO = 1.15
TARGET_BYTES_RATIO = 1.3
POLL_SECONDS = 0.05
LOG_EVENTS = ("checkpoint_queued", "merge_started", "merge_process_started", "candidate_merged", "merge_finished")


@dataclass(frozen=True)
class Io:
    """Two counters of /proc/PID/io: bytes through read syscalls (page cache included) and from storage."""

    rchar: int
    read_bytes: int

    def __sub__(self, other: Io) -> Io:
        return Io(self.rchar - other.rchar, self.read_bytes - other.read_bytes)


@dataclass(frozen=True)
class Run:
    seconds: float
    io: Io
    inputs: int  # bytes of the weight files of base + previous + new


@dataclass
class Daemon:
    proc: subprocess.Popen
    work: Path
    config: Path
    log: Path
    env: dict[str, str]

    @property
    def inbox(self) -> Path:
        return self.work / "inbox"

    @property
    def production_link(self) -> Path:
        return self.work / "store" / "production"


def read_io(pid: int | str = "self") -> Io:
    fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return Io(int(fields["rchar"]), int(fields["read_bytes"]))


def children_of(pid: int) -> list[int]:
    """Live (or unreaped) children, from every process's parent pid (no /proc/PID/task/*/children here)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def bench_env() -> dict[str, str]:
    """One torch thread per process, passive OpenMP waits, offline; no NUFILT_* overriding the config."""
    env = {k: v for k, v in child_env(1).items() if not k.startswith("NUFILT_")}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def write_config(work: Path, base: Path, settle: float) -> Path:
    quote = json.dumps  # a JSON string is a TOML basic string
    lines = [f"base_model = {quote(str(base))}", f"watch_dir = {quote(str(work / 'inbox'))}",
             f"store_dir = {quote(str(work / 'store'))}", f"state_dir = {quote(str(work / 'state'))}",
             "metrics_port = 0", 'device = "cpu"', "threads = 1", 'log_format = "json"',
             "[folder]", f"settle_seconds = {settle}"]  # [mlflow] left out: MLflow off
    config = work / "daemon.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def log_records(log: Path) -> list[dict]:
    records = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def check_alive(d: Daemon) -> None:
    if d.proc.poll() is not None:
        tail = "\n".join(d.log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"the daemon exited with {d.proc.returncode}:\n{tail}")


def start_daemon(work: Path, base: Path, settle: float, env: dict[str, str], timeout: float) -> tuple[Daemon, float]:
    """Start it and wait for its `daemon_ready` log event; confirmed by `nufilt status --json`."""
    (work / "inbox").mkdir()
    config = write_config(work, base, settle)
    log = work / "daemon.log"
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen([str(NUFILT), "daemon", "--config", str(config)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    d = Daemon(proc, work, config, log, env)
    deadline = time.monotonic() + timeout
    while not any(r.get("event") == "daemon_ready" for r in log_records(log)):
        check_alive(d)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon was not ready after {timeout:g} s")
        time.sleep(POLL_SECONDS)
    ready = time.perf_counter() - t0
    status = cli_json(d, "status")["daemon"]
    if not status.get("running") or status.get("pid") != proc.pid:
        raise RuntimeError(f"nufilt status does not see the daemon: {status}")
    return d, ready


def stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.terminate()
        try:
            d.proc.wait(60)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


def cli_json(d: Daemon, *args: str) -> dict:
    out = subprocess.run([str(NUFILT), *args, "--config", str(d.config), "--json"], capture_output=True,
                         text=True, env=d.env, check=True).stdout
    return json.loads(out)


def fresh_copy(src: Path, dest: Path) -> Path:
    """A copy written and fsynced before anything is timed (so no write-back of it lands in a measurement)."""
    shutil.copytree(src, dest)
    for f in dest.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    return dest


def production(d: Daemon) -> str | None:
    try:
        return os.readlink(d.production_link)
    except FileNotFoundError:
        return None


def wait_production_moves(d: Daemon, before: str | None, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (now := production(d)) == before:
        check_alive(d)
        if time.monotonic() > deadline:
            raise TimeoutError(f"production did not move from {before} in {timeout:g} s")
        time.sleep(POLL_SECONDS)
    assert now is not None
    return now


def wait_logged(d: Daemon, name: str, event: str, timeout: float = 30.0) -> None:
    """Until the daemon logs `event` for checkpoint `name` (merge_finished: after the promotion, its job done)."""
    deadline = time.monotonic() + timeout
    while not any(r.get("event") == event and r.get("checkpoint") == name for r in log_records(d.log)):
        check_alive(d)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event} for {name} in the daemon's log {timeout:g} s on")
        time.sleep(POLL_SECONDS)


def wait_reaped(d: Daemon, name: str, timeout: float = 10.0) -> None:
    """Until the merge process of `name`'s job is reaped (the pre-started one for the next job may run on)."""
    pids = {r["pid"] for r in log_records(d.log) if r.get("event") == "merge_process_started"
            and r.get("checkpoint") == name}
    deadline = time.monotonic() + timeout
    while pids & set(children_of(d.proc.pid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the merge process {pids} of {name} still runs {timeout:g} s on")
        time.sleep(POLL_SECONDS)


def daemon_step(d: Daemon, checkpoint: Path, name: str, base: Path, timeout: float,
                cold: bool = False) -> tuple[Run, float, Path]:
    """Drop `checkpoint` as `name`: (the run, the rename's time.time(), the new production folder)."""
    staged = fresh_copy(checkpoint, d.work / "drop" / name)
    before = production(d)
    previous = d.production_link.parent / before if before else None
    if cold:
        evict([p for p in (base, previous, staged) if p is not None])
    io0, wall0, t0 = read_io(d.proc.pid), time.time(), time.perf_counter()
    os.rename(staged, d.inbox / name)
    now = wait_production_moves(d, before, timeout)
    seconds = time.perf_counter() - t0
    wait_logged(d, name, "merge_finished")
    wait_reaped(d, name)
    io = read_io(d.proc.pid) - io0
    inputs = sum(folder_bytes(p) for p in (base, checkpoint) + ((previous,) if previous else ()))
    for processed in (d.inbox / ".processed").glob(f"*-{name}"):  # its staged hard link is gone by now
        shutil.rmtree(processed)
    return Run(seconds, io, inputs), wall0, d.production_link.parent / now


def merge_alone(work: Path, base: Path, previous: Path, checkpoint: Path, env: dict[str, str],
                cold: bool = False) -> Run:
    new = fresh_copy(checkpoint, work / "merge-in" / checkpoint.name)
    out = work / "merge-out"
    if cold:
        evict([base, previous, new])
    io0 = read_io()
    seconds = merge_seconds(base, previous, new, out, ["--threads", "1", "--quiet"], env)
    io = read_io() - io0
    inputs = sum(folder_bytes(p) for p in (base, previous, new))
    shutil.rmtree(new)
    shutil.rmtree(out)
    return Run(seconds, io, inputs)


def startup_reads(env: dict[str, str]) -> int:
    """rchar of one process starting Python, torch and the CLI (`nufilt merge --help`): part of any count above."""
    io0 = read_io()
    subprocess.run([str(NUFILT), "merge", "--help"], capture_output=True, env=env, check=True)
    return (read_io() - io0).rchar


def rollback(d: Daemon) -> None:
    subprocess.run([str(NUFILT), "rollback", "--config", str(d.config), "--reason", "daemon_step.py repeat"],
                   check=True, capture_output=True, env=d.env)


def timeline(d: Daemon, name: str, wall0: float) -> str:
    """The daemon's own phases of one step, from its log events (seconds after the rename)."""
    events = {r["event"]: r for r in log_records(d.log) if r.get("checkpoint") == name and r.get("event") in LOG_EVENTS}

    def at(event: str) -> str:
        if event not in events:
            return "?"
        return f"{datetime.fromisoformat(events[event]['timestamp']).timestamp() - wall0:+.2f} s"

    child = events.get("candidate_merged", {}).get("seconds") or {}
    done = events.get("merge_finished", {})
    return (f"queued (settled, hashed, staged) {at('checkpoint_queued')}; merge started {at('merge_started')}; "
            f"merge process started {at('merge_process_started')}; merged {at('candidate_merged')} (merge "
            f"process phases: {', '.join(f'{k} {v:.2f} s' for k, v in child.items()) or '?'}); promoted "
            f"{at('merge_finished')} (merge_seconds {done.get('merge_seconds', '?')}, validation_seconds "
            f"{done.get('validation_seconds', '?')})")


def print_rows(daemon: list[Run], merge: list[Run]) -> None:
    print(f"{'run':<8}{'drop→prod s':>12}{'merge s':>9}{'ratio':>7}{'daemon GB':>11}{'merge GB':>10}"
          f"{'inputs GB':>11}{'daemon/in':>11}{'merge/in':>10}{'daemon disk GB':>16}{'merge disk GB':>15}")
    for i, (dm, mg) in enumerate(zip(daemon, merge, strict=True), 1):
        print(f"{i:<8}{dm.seconds:>12.2f}{mg.seconds:>9.2f}{dm.seconds / mg.seconds:>7.2f}"
              f"{dm.io.rchar / 1e9:>11.2f}{mg.io.rchar / 1e9:>10.2f}{dm.inputs / 1e9:>11.2f}"
              f"{dm.io.rchar / dm.inputs:>11.2f}{mg.io.rchar / mg.inputs:>10.2f}"
              f"{dm.io.read_bytes / 1e9:>16.2f}{mg.io.read_bytes / 1e9:>15.2f}")


def summarise(daemon: list[Run], merge: list[Run]) -> bool:
    """Medians, the ratios against the targets; True when both are met."""
    med = statistics.median
    d_s, m_s = med(r.seconds for r in daemon), med(r.seconds for r in merge)
    d_b, inputs = med(r.io.rchar for r in daemon), med(r.inputs for r in daemon)
    d_disk, m_disk = med(r.io.read_bytes for r in daemon), med(r.io.read_bytes for r in merge)
    time_ok, bytes_ok = d_s / m_s <= TARGET_TIME_RATIO, d_b / inputs <= TARGET_BYTES_RATIO
    n = f"median of {len(daemon)}" if len(daemon) > 1 else "one run"
    print(f"drop→production {d_s:.2f} s vs nufilt merge {m_s:.2f} s ({n}): {d_s / m_s:.2f}x "
          f"(≤ {TARGET_TIME_RATIO:g}x: {verdict(time_ok)})")
    print(f"daemon read {gb(d_b)} (rchar) = {d_b / inputs:.2f}x the inputs' weight files {gb(inputs)} "
          f"(≤ {TARGET_BYTES_RATIO:g}x: {verdict(bytes_ok)}); nufilt merge read "
          f"{gb(med(r.io.rchar for r in merge))} ({med(r.io.rchar for r in merge) / inputs:.2f}x)")
    print(f"from storage (read_bytes; meaningful with --cold): daemon {gb(d_disk)} = {d_disk / inputs:.2f}x the "
          f"inputs, nufilt merge {gb(m_disk)} = {m_disk / inputs:.2f}x")
    return time_ok and bytes_ok


def step_one(d: Daemon, models: dict[str, Path], base: Path, timeout: float) -> Path:
    run, wall0, v1 = daemon_step(d, models["ft-1"], "ckpt-1", base, timeout)
    print(f"step 1 (daemon, from the base): drop→production {run.seconds:.2f} s, read {gb(run.io.rchar)} "
          f"({run.io.rchar / run.inputs:.2f}x base + checkpoint); {v1.name}")
    print(f"  {timeline(d, 'ckpt-1', wall0)}")
    return v1


def step_two(d: Daemon, models: dict[str, Path], v1: Path, repeats: int, timeout: float,
             cold: bool = False) -> tuple[list[Run], list[Run]]:
    """Step 2 from v1, `repeats` times (checkpoints 2 … repeats+1), daemon and merge alternating in order."""
    base, daemon, merge = models["base"], [], []
    for i in range(repeats):
        ckpt, name = models[f"ft-{i + 2}"], f"ckpt-{i + 2}"
        if i:
            rollback(d)  # production back to v1: the next checkpoint is merged at step 2 again
        if i % 2:
            merge.append(merge_alone(d.work, base, v1, ckpt, d.env, cold))
        run, wall0, now = daemon_step(d, ckpt, name, base, timeout, cold)
        daemon.append(run)
        if not i % 2:
            merge.append(merge_alone(d.work, base, v1, ckpt, d.env, cold))
        print(f"step 2 #{i + 1} ({name} → {now.name}): {timeline(d, name, wall0)}")
    return daemon, merge


def write_json(args: argparse.Namespace, ready: float, daemon: list[Run], merge: list[Run]) -> None:
    figures = {"shape": args.shape, "settle_seconds": args.settle, "cold": args.cold, "ready_seconds": ready,
               "daemon": [asdict(r) for r in daemon], "merge": [asdict(r) for r in merge]}
    args.json.write_text(json.dumps(figures, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="vit-b-32")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    ap.add_argument("--repeat", type=int, default=1, help="step-2 runs of each; medians count")
    ap.add_argument("--settle", type=float, default=0.2, help="the folder source's settle_seconds")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for readiness or a promotion")
    ap.add_argument("--models-root", type=Path, default=CACHE, help="where the models are written (and reused)")
    ap.add_argument("--tmp", type=Path, help="parent of the temporary folder (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each timed "
                    "step, so read_bytes counts the reads from storage")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = ensure_models(args.shape, args.repeat + 1, args.seed, args.models_root)
    work = Path(tempfile.mkdtemp(prefix="nufilt-daemon-step-", dir=args.tmp))
    (work / "drop").mkdir()  # the inbox's sibling: a copy is written here, then renamed into the inbox
    env = bench_env()
    print(f"shape {args.shape}; temporary folder {work}; threads 1, OMP_WAIT_POLICY=PASSIVE; folder source "
          f"settle_seconds {args.settle:g}; production watched by reading STORE/production every "
          f"{POLL_SECONDS * 1000:.0f} ms; load average before {os.getloadavg()[0]:.2f}")
    print(f"start-up reads of one process (nufilt merge --help): {startup_reads(env) / 1e6:.0f} MB (rchar)")
    d: Daemon | None = None
    try:
        d, ready = start_daemon(work, models["base"], args.settle, env, args.timeout)
        print(f"daemon pid {d.proc.pid} ready {ready:.2f} s after its start (`daemon_ready` in its log; "
              f"`nufilt status --json` agrees)")
        v1 = step_one(d, models, models["base"], args.timeout)
        daemon, merge = step_two(d, models, v1, args.repeat, args.timeout, args.cold)
        print_rows(daemon, merge)
        ok = summarise(daemon, merge)
        if args.json:
            write_json(args, ready, daemon, merge)
    finally:
        if d is not None:
            stop_daemon(d)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
