"""Does `nufilt merge` stop on every SIGTERM sent as its merge pass begins? (nufilt_core/interrupts.py)

The moment the hidden temporary output appears is when the merge first loads SciPy; a SIGTERM that lands
in those imports used to be swallowed, and the merge went on. This runs step 2 of a small lineage (six
256×256 attention weights: NUFILT's SciPy eigensolver path; `--iters 100000`, so a lost signal shows as a
merge still running) `--trials` times in fresh processes, sends SIGTERM as soon as the temporary folder
exists (after a random 0–0.3 s in a quarter of the trials), and counts the merges that did not exit 130
within 30 s, leaving nothing behind. `--busy N` keeps N cores
busy meanwhile (the loss needed a loaded machine); `--tree DIR` runs another checkout's code (e.g. a git
worktree of an older commit) with this venv, for a side-by-side count.

    .venv/bin/python bench/reliability/sigterm.py --trials 100 --busy 1           # ≈ 12 min here
    git worktree add /tmp/old 5e75bea      # the checkout before the fix, run beside it:
    .venv/bin/python bench/reliability/sigterm.py --trials 100 --busy 1 --tree /tmp/old
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LAUNCH = ("import sys; sys.path[:0] = [p for p in sys.argv.pop().split(':') if p]; "
          "from nufilt_daemon.cli import main; sys.exit(main())")


def nufilt(tree: Path | None, *args: str) -> list[str]:
    """A `nufilt` command line running this checkout, or `tree`'s code with this venv."""
    paths = f"{tree}:{tree / 'daemon'}" if tree else ""
    return [sys.executable, "-c", LAUNCH, *args, paths]


def write_models(root: Path) -> None:
    """base, t1, t2 in `root`: the shapes of tests/test_hostile_inputs.py's SIGTERM test."""
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.attn.q_proj.weight": torch.randn(256, 256, generator=g) for i in range(6)}
    for name, noise in (("base", 0.0), ("t1", 0.01), ("t2", 0.01)):
        (root / name).mkdir()
        state = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})


def trial(cmd: list[str], out: Path, delay: float) -> tuple[bool, float]:
    """(stopped cleanly, seconds from SIGTERM to exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the tests run: the SciPy eigensolver path
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while not (out.parent.is_dir() and any(".tmp-" in p.name for p in out.parent.iterdir())):
        if proc.poll() is not None:
            raise SystemExit(f"the merge ended before it could be signalled: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    time.sleep(delay)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        shutil.rmtree(out.parent)
        return False, time.monotonic() - sent
    clean = proc.returncode == 130 and "interrupted" in err and not any(out.parent.iterdir())
    shutil.rmtree(out.parent)
    return clean, time.monotonic() - sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--busy", type=int, default=0, help="cores to keep busy with spin loops meanwhile")
    p.add_argument("--tree", type=Path, help="run this checkout's nufilt_core and nufilt_daemon instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_models(root)
            base, m1 = root / "base", root / "m1"
            subprocess.run(nufilt(args.tree, "merge", "--base", str(base), "--checkpoint", str(root / "t1"),
                                  "--output", str(m1), "--quiet"), check=True, stderr=subprocess.DEVNULL)
            lost, seconds = 0, []
            for i in range(args.trials):
                out = root / f"w{i}" / "m2"
                cmd = nufilt(args.tree, "merge", "--base", str(base), "--previous", str(m1), "--checkpoint",
                             str(root / "t2"), "--output", str(out), "--iters", "100000", "--quiet")
                clean, secs = trial(cmd, out, rng.random() * 0.3 if rng.random() < 0.25 else 0.0)
                lost += not clean
                seconds.append(secs)
                print(f"trial {i + 1}/{args.trials}: {'stopped' if clean else 'LOST'} in {secs:.2f}s", flush=True)
    finally:
        for s in spinners:
            s.kill()
    seconds.sort()
    print(f"\n{args.tree or 'this checkout'}: {lost} of {args.trials} SIGTERMs lost (busy cores: {args.busy}); "
          f"exit after SIGTERM: median {seconds[len(seconds) // 2]:.2f}s, max {seconds[-1]:.2f}s")


if __name__ == "__main__":
    main()
