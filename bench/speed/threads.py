"""Does the default thread behaviour of `nufilt merge` use the cores, idle and beside a busy process?

By default NUFILT merges as many matrices at once as the process may use cores, one thread each (no
thread waits for another inside a matrix's algebra); torch's OpenMP threads, where other methods use
them, wait passively (nufilt_core sets OMP_WAIT_POLICY=PASSIVE before torch loads, unless the user set
it): a spinning thread burns the time its descheduled sibling needs. This runs the whole CLI, `nufilt
merge` step 2 on the same inputs, in fresh processes, side by side in one run:

  idle   nothing else running
  busy   beside one process that keeps one core busy (a Python spin loop)

with these settings: the default (no OMP_* variables: what a user gets), `--threads 1`, spinning
threads (OMP_WAIT_POLICY=ACTIVE, what torch does without our default at its worst), and with
`--executors local,ray` the ray executor twice: on a Ray head this script starts on loopback with
one CPU per core (the driver joins it for the step; its workers start with the step), and with no
address (the step starts a Ray instance of its own, what `--executor ray` alone does).
Each (situation, setting) runs `--repeats` times, interleaved; the median is reported, and the
ratios against `--threads 1` in the same situation are what the targets judge:
  busy: default ≤ 1.2 × --threads 1;  idle: default ≤ 0.65 × --threads 1 (two cores: 0.5 is the limit).

    .venv/bin/python bench/speed/threads.py --shape vit-b-32     # ≈ 6 min here
    .venv/bin/python bench/speed/threads.py --shape vit-b-32 --executors local,ray --situations idle
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from make_models import CACHE, ensure_models

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the tests' loopback Ray head
from ray_head import LOOPBACK_ENV, RayHead

NUFILT = Path(sys.executable).with_name("nufilt")
SETTINGS = {
    "default": ([], {}),
    "--threads 1": (["--threads", "1"], {}),
    "spinning (OMP_WAIT_POLICY=ACTIVE)": ([], {"OMP_WAIT_POLICY": "ACTIVE"}),
}
RAY_HEAD = "ray executor, loopback head"
RAY_SETTINGS = {
    RAY_HEAD: (["--executor", "ray"], {}),  # --ray-address added once the head is up
    "ray executor, an instance per step": (["--executor", "ray"], LOOPBACK_ENV),
}
TARGETS = {"busy": 1.2, "idle": 0.65}


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without thread settings, so each run gets exactly the setting under test."""
    drop = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def merge_seconds(base: Path, previous: Path, checkpoint: Path, out: Path, args: list[str],
                  env: dict[str, str]) -> float:
    cmd = [str(NUFILT), "merge", "--base", str(base), "--previous", str(previous), "--checkpoint", str(checkpoint),
           "--output", str(out), "--overwrite", "--device", "cpu", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


@contextmanager
def busy_core(on: bool):
    """One process spinning on one core for the duration (nothing when `on` is false)."""
    if not on:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # let it take its core before the measured run starts
        yield
    finally:
        hog.kill()
        hog.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="vit-b-32", help="vit-b-32, vit-b-16, vit-l-14, vit-tiny")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (situation, setting); the median counts")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--executors", default="local", help="local, or local,ray to add the ray executor's settings")
    ap.add_argument("--situations", default="idle,busy", help="idle, busy, or both")
    args = ap.parse_args(argv)
    settings = dict(SETTINGS)
    head = None
    if "ray" in args.executors.split(","):
        head = RayHead(cpus=os.cpu_count() or 1).start()
        settings.update(RAY_SETTINGS)
        settings[RAY_HEAD] = ([*settings[RAY_HEAD][0], "--ray-address", head.address], {})
    situations = [x for x in TARGETS if x in args.situations.split(",")]
    try:
        return measure(args, settings, situations)
    finally:
        if head is not None:
            head.stop()


def measure(args: argparse.Namespace, settings: dict[str, tuple[list[str], dict[str, str]]],
            situations: list[str]) -> int:

    models = ensure_models(args.shape, 2, 0)
    work = CACHE / f"{args.shape}-s0"
    merged1 = work / "merged-1-threads"
    if not merged1.exists():
        subprocess.run([str(NUFILT), "merge", "--base", str(models["base"]), "--checkpoint", str(models["ft-1"]),
                        "--output", str(merged1), "--device", "cpu"], check=True, env=clean_env({}),
                       capture_output=True)
    out = work / "merged-2-threads"
    print(f"shape {args.shape}, {os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    times: dict[str, dict[str, list[float]]] = {s: {k: [] for k in settings} for s in situations}
    for _ in range(args.repeats):
        for situation in situations:
            with busy_core(situation == "busy"):
                for name, (cli_args, extra) in settings.items():
                    times[situation][name].append(merge_seconds(models["base"], merged1, models["ft-2"], out,
                                                                cli_args, clean_env(extra)))
    ok = True
    print(f"{'situation':<10}{'setting':<36}{'wall s (median)':>16}{'vs --threads 1':>16}")
    figures = {}
    for situation in situations:
        target = TARGETS[situation]
        one = statistics.median(times[situation]["--threads 1"])
        for name, runs in times[situation].items():
            med = statistics.median(runs)
            figures[f"{situation}/{name}"] = {"runs": runs, "median": med, "ratio": med / one}
            print(f"{situation:<10}{name:<36}{med:>16.1f}{med / one:>15.2f}x")
        ratio = statistics.median(times[situation]["default"]) / one
        hit = ratio <= target
        ok = ok and hit
        print(f"  {situation}: default ≤ {target:g} × --threads 1: {'PASS' if hit else 'MISS'} ({ratio:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "cpus": os.cpu_count(), **figures}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
