"""CPU-vs-CUDA parity of the merge engine, and the time of a NUFILT step on each device.

The CPU result is the reference; a CUDA run must match it within 1e-4 relative. On
the same small CLIP-ViT-shaped inputs (make_models.py), each device runs step 1 and then
step 2 from the *same* step-1 output (the first device's), so the two step-2 runs see
identical inputs. Every float tensor is compared: ‖W_dev − W_cpu‖ / ‖W_cpu‖ (the target,
per tensor, worst one shown) and, stricter, the same difference over the step's update.

    .venv/bin/python bench/speed/device_parity.py                       # cpu vs cuda, vit-tiny
    .venv/bin/python bench/speed/device_parity.py --time-shape vit-b-32 # + a timed ViT-B/32 step each
    .venv/bin/python bench/speed/device_parity.py --devices cpu,cpu     # no GPU: checks the script itself

Exit status 1 when a device misses the tolerance, 2 when a device asked for is not there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from compare import relative_difference
from make_models import CACHE, ensure_models
from measure import run_child

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.devices import resolve_device
from nufilt_core.errors import NufiltError
from nufilt_core.merge import MergeRequest, merge_step

TOLERANCE = 1e-4


def float_names(path: Path) -> list[str]:
    return [n for n, i in Checkpoint.open(path).tensors.items() if i.is_float]


def merge(base: Path, ckpt: Path, out: Path, previous: Path | None, device: str) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    merge_step(MergeRequest(base=base, checkpoint=ckpt, output=out, previous=previous, device=device))
    return out


def parity(shape: str, devices: list[str], root: Path, seed: int) -> bool:
    """Step 1 and step 2 on every device; True when each matches the first device within TOLERANCE."""
    models = ensure_models(shape, 2, seed, root)
    work = root / f"{shape}-s{seed}" / "parity"
    work.mkdir(exist_ok=True)
    ref_dev = devices[0]
    tags = [f"{i}-{d.replace(':', '')}" for i, d in enumerate(devices)]
    step1 = [merge(models["base"], models["ft-1"], work / f"m1-{tags[i]}", None, d) for i, d in enumerate(devices)]
    step2 = [merge(models["base"], models["ft-2"], work / f"m2-{tags[i]}", step1[0], d) for i, d in enumerate(devices)]
    names = float_names(models["base"])
    ok = True
    print(f"{shape}: {len(names)} float tensors, reference device {ref_dev}, tolerance {TOLERANCE:g} "
          "(per tensor, relative to the weights)")
    for i, device in enumerate(devices[1:], 1):
        for step, outs, prev in ((1, step1, models["base"]), (2, step2, step1[0])):
            d = relative_difference(outs[i], outs[0], previous=prev, names=names)
            good = d.weights_max <= TOLERANCE
            ok &= good
            print(f"  step {step} {device} vs {ref_dev}: weights max {d.weights_max:.2e} ({d.weights_worst}), "
                  f"update {d.update:.2e} (max {d.update_max:.2e})  {'PASS' if good else 'MISS'}")
    return ok


def timed_step(shape: str, devices: list[str], root: Path, seed: int, threads: int | None) -> None:
    """Step 2 of `shape` on each device, each in a fresh process (time and peak memory)."""
    models = ensure_models(shape, 2, seed, root)
    work = root / f"{shape}-s{seed}"
    merged1 = work / "merged-1"
    if not merged1.exists():
        run_child(["engine", "--base", str(models["base"]), "--checkpoint", str(models["ft-1"]),
                   "--output", str(merged1), "--device", devices[-1]], threads)
    for device in devices:
        r = run_child(["engine", "--base", str(models["base"]), "--previous", str(merged1),
                       "--checkpoint", str(models["ft-2"]), "--output", str(work / f"merged-2-{device}"),
                       "--device", device, "--overwrite"], threads)
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"].items())
        gpu = f", CUDA peak {r['cuda_peak_bytes'] / 1e9:.2f} GB" if "cuda_peak_bytes" in r else ""
        print(f"  {shape} step 2 on {r['device']}: {r['seconds']:.1f}s wall, {r['cpu_seconds']:.1f}s CPU "
              f"({phases}); peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB{gpu}; threads {r['threads']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; the first is the reference")
    ap.add_argument("--shape", default="vit-tiny", help="shape of the parity inputs (make_models.py)")
    ap.add_argument("--time-shape", help="also time step 2 of this shape on each device, e.g. vit-b-32")
    ap.add_argument("--root", type=Path, default=CACHE, help="where models and outputs go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads of the timed runs")
    args = ap.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if len(devices) < 2:
        ap.error("--devices needs at least two devices to compare")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    try:
        for device in devices:  # fail before generating anything when a device is missing
            resolve_device(device)
        ok = parity(args.shape, devices, args.root, args.seed)
        if args.time_shape:
            timed_step(args.time_shape, devices, args.root, args.seed, args.threads)
    except NufiltError as e:  # e.g. --device cuda on a machine without CUDA
        print(f"device_parity: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
