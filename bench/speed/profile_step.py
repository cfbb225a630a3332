"""Where the time of one NUFILT step goes, and how far it is from this machine's limit.

The step is nufilt_step.py's: the ViT-B/32-shaped step 2 (base, previous = the engine's step-1
output, checkpoint = θ_2; make_models.ensure_models), run through the engine (`merge_step`, what
`nufilt merge` runs) in a fresh process with one thread:

  1. profiled: `worker.py engine --profile` runs it under cProfile (by default on the thread's CPU
     clock, which the neighbours on a shared machine do not inflate), and the profile is grouped by
     function into read, hash, finite checks, Gram matrices, the eigendecompositions for V̂p and for
     V̂t, the Adam loop, fusing (with the rest of NUFILT's algebra), write (serialise + fsync), other;
  2. plain: the same step without the profiler, for its overhead;
  3. this machine, in a third fresh process with one thread: fp32/fp64 matmul and fp64 eigh speed
     on the step's shapes, sha256 and isfinite speed, read speed (page cache, and the disk itself
     with O_DIRECT) and write + fsync speed.
The step's work is counted from the shapes (filtered matrices, r_p, r_v, r_l, Adam steps; bytes of
the inputs and the output), and each category's floor is that work at the measured speed, printed
beside the measured time. Figures are seconds and % of the profiled step.

    .venv/bin/python bench/speed/profile_step.py --shape vit-b-32     # ≈ 1.5 min here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from make_models import CACHE, ensure_models
from measure import report, run_child
from nufilt_step import engine_args, folder_bytes, gb

from nufilt_core.checkpoint import Checkpoint, all_finite
from nufilt_core.linalg import GRAM_BLOCK, gram64, lapack_top_eigenpairs, top_eigenpairs
from nufilt_core.lineage import LineageRecord
from nufilt_core.methods.nufilt import Nufilt, NufiltSettings

IO, CKPT, LINALG = "nufilt_core/safetensors_io.py", "nufilt_core/checkpoint.py", "nufilt_core/linalg.py"
NUFILT, MERGE, FSUTIL = "nufilt_core/methods/nufilt.py", "nufilt_core/merge.py", "nufilt_core/fsutil.py"
READAHEAD = "nufilt_core/readahead.py"
Func = tuple[str, str]  # (file suffix, function name)
MiB = 1024**2


class Profile:
    """cProfile stats, looked up by (file suffix, function name): cumulative time of a function, and of a
    function when called from another (cProfile's per-edge figures)."""

    def __init__(self, path: Path):
        self.stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]

    def _keys(self, f: Func) -> list[tuple[str, int, str]]:
        return [k for k in self.stats if k[0].replace(os.sep, "/").endswith(f[0]) and k[2] == f[1]]

    def cum(self, f: Func) -> float:
        return sum(self.stats[k][3] for k in self._keys(f))

    def edge(self, caller: Func, callee: Func) -> float:
        callers = set(self._keys(caller))
        return sum(t[3] for k in self._keys(callee) for c, t in self.stats[k][4].items() if c in callers)


def breakdown(p: Profile) -> tuple[float, list[tuple[str, float]]]:
    """The step's time and its categories, on the main thread (the one cProfile sees). Each is a function's
    cumulative time less what it calls that another category counts; the engine computes V̂p and V̂t in
    functions of their own, each of which forms its Gram matrix (linalg.gram64) and hands it to the
    eigendecomposition, so they separate exactly. The inputs are read and hashed on the read-ahead thread:
    the main thread's read and hash are what it does itself (the output's hash, tensors too big to read
    ahead), and its wait for that thread is a category of its own (≈ 0 on the CPU clock)."""
    vp, vt = (NUFILT, "earlier_task_directions"), (NUFILT, "new_task_directions")
    adam, gram = (NUFILT, "fit_adapter"), (LINALG, "gram64")
    digest, combine = (IO, "tensor_digest"), (IO, "combine_digests")
    write, close = (IO, "write"), (IO, "close")
    rows = [
        ("read (safetensors loads)", p.cum((IO, "read_raw"))),
        ("hash (sha256)", p.cum(digest) + p.cum(combine)),
        ("finite checks", p.cum((CKPT, "all_finite"))),
        ("Gram matrices (fp64)", p.cum(gram)),
        ("eigendecomposition for V̂p", p.cum(vp) - p.edge(vp, gram)),
        ("eigendecomposition for V̂t", p.cum(vt) - p.edge(vt, gram)),
        ("Adam loop", p.cum(adam)),
        ("fusing + the rest of the algebra", p.cum((NUFILT, "merge")) - p.cum(vp) - p.cum(vt) - p.cum(adam)),
        ("write (serialise + fsync)", p.cum(write) + p.cum(close) + p.cum((FSUTIL, "fsync_dir"))
         - p.edge(write, digest) - p.edge(close, combine)),
        ("waiting for the read-ahead thread", p.cum((READAHEAD, "read_ahead"))),
    ]
    total = p.cum((MERGE, "merge_step"))
    rows.append(("other (Python, checks, tensor copies)", total - sum(s for _, s in rows)))
    return total, rows


@dataclass
class Work:
    """What the step must do, counted from the shapes."""

    gram_flops: float = 0.0  # two fp64 Gram matrices per filtered matrix (their upper triangles, linalg.gram64)
    eigen_p_flops: float = 0.0  # a direct method's floor: tridiagonalise (4n³/3) + back-transform k vectors (2n²k)
    eigen_t_flops: float = 0.0
    adam_flops: float = 0.0  # the matrix products of every Adam step (the element-wise update is negligible)
    other_flops: float = 0.0  # τV̂ products, the filter and the fused update
    read_bytes: int = 0  # the three inputs, twice (check pass, merge pass)
    hash_bytes: int = 0  # the three inputs and the output
    finite_bytes: int = 0
    write_bytes: int = 0
    matrices: int = 0


def count_work(base: Path, previous: Path, new: Path, out_bytes: int) -> Work:
    s = NufiltSettings(**LineageRecord.read(previous).settings)
    ckpt = Checkpoint.open(base)
    selection = Nufilt.selection_of(s, list(ckpt.tensors))
    w = Work()
    inputs = sum(folder_bytes(p) for p in (base, previous, new))
    w.read_bytes, w.write_bytes = 2 * inputs, out_bytes
    w.hash_bytes = w.finite_bytes = inputs + out_bytes
    r, it = s.lora_rank, s.iters
    for name, info in ckpt.tensors.items():
        if not (info.is_float and selection.is_filtered(name, info.shape)):
            continue
        d_out, d_in = info.shape
        n, m = min(d_out, d_in), max(d_out, d_in)
        kp, kt = min(s.null_rank, n), min(s.task_rank, n)
        k = kp + kt
        w.matrices += 1
        w.gram_flops += 2 * sum(2 * m * min(GRAM_BLOCK, n - i) * (n - i) for i in range(0, n, GRAM_BLOCK))
        w.eigen_p_flops += 4 / 3 * n**3 + 2 * n * n * kp + (2 * m * n * kp if d_in > d_out else 0)
        w.eigen_t_flops += 4 / 3 * n**3 + 2 * n * n * kt + (2 * m * n * kt if d_in > d_out else 0)
        if d_in < 2 * d_out:  # the Gram path (methods/nufilt.fit_adapter)
            per_step = 2 * d_in * d_in * r + 4 * d_in * r * r + 8 * d_in * r * k + 4 * r * r * k
            setup = 2 * d_in * d_out * k
        else:
            per_step = 4 * d_out * d_in * r + 6 * d_out * r * k + 4 * r * d_in * k
            setup = 0
        w.adam_flops += it * per_step + setup
        w.other_flops += 2 * d_out * d_in * (2 * k + 3 * kp + 2 * r)  # τV̂ ×2, τ_{≤t-1}V̂p, filter, τB, (τB)A
    return w


# ---- this machine's speeds (run in a fresh one-thread process: `--machine`) ----

def best(fn: Callable[[], object], repeats: int = 3, clock: Callable[[], float] = time.thread_time) -> float:
    """Fastest of `repeats` runs: the machine's speed, not the neighbours'."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def direct_read(path: Path, limit: int) -> tuple[int, float]:
    """Read up to `limit` bytes of a file with O_DIRECT (past the page cache): bytes, wall seconds."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = mmap.mmap(-1, 8 * MiB)  # page-aligned, as O_DIRECT needs
    got, t0 = 0, time.perf_counter()
    try:
        while got < limit:
            n = os.preadv(fd, [buf], got)
            if n <= 0:
                break
            got += n
    finally:
        os.close(fd)
        buf.close()
    return got, time.perf_counter() - t0


def measure_machine(base: Path, previous: Path, scratch: Path) -> dict[str, Any]:
    ckpt, prev = Checkpoint.open(base), Checkpoint.open(previous)
    s = NufiltSettings(**LineageRecord.read(previous).settings)
    selection = Nufilt.selection_of(s, list(ckpt.tensors))
    name = max((n for n, i in ckpt.tensors.items() if i.is_float and selection.is_filtered(n, i.shape)),
               key=lambda n: ckpt.tensors[n].numel)  # the largest filtered matrix
    tau = prev.read(name).float() - ckpt.read(name).float()
    n, m = min(tau.shape), max(tau.shape)
    g = gram64(tau)
    rates: dict[str, Any] = {"shape": list(tau.shape), "threads": torch.get_num_threads()}
    b32 = torch.randn(n, s.lora_rank)
    g32 = g.float()
    rates["gflops_fp32"] = 2 * n * n * s.lora_rank / best(lambda: [g32 @ b32 for _ in range(20)]) * 20 / 1e9
    tau64 = tau.double()
    rates["gflops_fp64"] = 2 * n * n * m / best(lambda: tau64.T @ tau64) / 1e9
    rates["eigh_seconds"] = best(lambda: torch.linalg.eigh(g))
    # the engine's solvers on the same Gram matrix: syevr for V̂p (None where it does not apply), subspace
    # iteration for V̂t (None where it falls back to eigh)
    rates["syevr_rp_seconds"] = best(lambda: lapack_top_eigenpairs(g, s.null_rank)) \
        if lapack_top_eigenpairs(g, s.null_rank) is not None else float("nan")
    rates["subspace_rv_seconds"] = best(lambda: top_eigenpairs(g, s.task_rank)) \
        if top_eigenpairs(g, s.task_rank) is not None else float("nan")
    rates["eigh_floor_gflops"] = (4 / 3 * n**3 + 2 * n * n * s.null_rank) / rates["eigh_seconds"] / 1e9
    blob = torch.randn(16 * MiB)  # 64 MiB of fp32
    raw = blob.numpy().tobytes()
    rates["sha256_gbs"] = len(raw) / best(lambda: hashlib.sha256(raw).digest()) / 1e9
    rates["finite_gbs"] = len(raw) / best(lambda: all_finite(blob)) / 1e9
    try:  # a direct eigensolver's reduction to tridiagonal form, alone: LAPACK's syevr asked for one pair
        from scipy.linalg import eigh as lapack_eigh

        rates["tridiagonal_seconds"] = best(lambda: lapack_eigh(g.numpy(), subset_by_index=[n - 1, n - 1],
                                                                driver="evr", check_finite=False))
    except ImportError:
        rates["tridiagonal_seconds"] = float("nan")
    infos = list(ckpt.tensors.values())
    total = sum(i.nbytes for i in infos)
    rates["read_cache_gbs"] = total / best(lambda: [ckpt.read(i.name) for i in infos], 2, time.perf_counter) / 1e9
    got, secs = direct_read(ckpt.tensors[name].file, 256 * MiB)
    rates["read_disk_gbs"] = got / secs / 1e9
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f".write-speed-{os.getpid()}"
    try:
        t0 = time.perf_counter()
        with open(target, "wb") as f:
            for _ in range(4):  # 256 MiB
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        rates["write_gbs"] = 4 * len(raw) / (time.perf_counter() - t0) / 1e9
    finally:
        target.unlink(missing_ok=True)
    return rates


def floors(w: Work, r: dict[str, Any]) -> dict[str, float]:
    """Each category's work at this machine's measured speed (seconds)."""
    return {
        "read (safetensors loads)": w.read_bytes / (r["read_cache_gbs"] * 1e9),
        "hash (sha256)": w.hash_bytes / (r["sha256_gbs"] * 1e9),
        "finite checks": w.finite_bytes / (r["finite_gbs"] * 1e9),
        "Gram matrices (fp64)": w.gram_flops / (r["gflops_fp64"] * 1e9),
        "eigendecomposition for V̂p": w.eigen_p_flops / (r["gflops_fp64"] * 1e9),
        "eigendecomposition for V̂t": w.eigen_t_flops / (r["gflops_fp64"] * 1e9),
        "Adam loop": w.adam_flops / (r["gflops_fp32"] * 1e9),
        "fusing + the rest of the algebra": w.other_flops / (r["gflops_fp32"] * 1e9),
        "write (serialise + fsync)": w.write_bytes / (r["write_gbs"] * 1e9),
    }


def print_report(eng: dict, plain: dict, total: float, rows: list[tuple[str, float]], w: Work,
                 rates: dict[str, Any], clock: str) -> dict[str, float]:
    floor = floors(w, rates)
    overhead = eng["cpu_seconds"] / plain["cpu_seconds"]
    print(f"step 2, engine, one thread: plain {plain['seconds']:.1f} s wall / {plain['cpu_seconds']:.1f} CPU-s; "
          f"profiled {eng['seconds']:.1f} s wall / {eng['cpu_seconds']:.1f} CPU-s ({overhead:.2f}x the plain CPU "
          f"time); engine phases (plain) " + ", ".join(f"{k} {v:.1f}s" for k, v in plain["phases"].items()))
    print(f"breakdown of the profiled step ({clock} clock, {total:.2f} s), floor = the work at this machine's "
          "measured speed:")
    print(f"  {'category':<38}{'seconds':>9}{'% step':>8}{'floor s':>9}{'x floor':>9}  work")
    work = {"read (safetensors loads)": f"{gb(w.read_bytes)} (3 inputs, twice)",
            "hash (sha256)": f"{gb(w.hash_bytes)}", "finite checks": f"{gb(w.finite_bytes)}",
            "Gram matrices (fp64)": f"{w.gram_flops / 1e9:.0f} GFLOP fp64",
            "eigendecomposition for V̂p": f"{w.eigen_p_flops / 1e9:.0f} GFLOP fp64 (direct method's floor)",
            "eigendecomposition for V̂t": f"{w.eigen_t_flops / 1e9:.0f} GFLOP fp64 (direct method's floor)",
            "Adam loop": f"{w.adam_flops / 1e9:.0f} GFLOP fp32",
            "fusing + the rest of the algebra": f"{w.other_flops / 1e9:.0f} GFLOP fp32",
            "write (serialise + fsync)": f"{gb(w.write_bytes)}"}
    for label, secs in rows:
        f = floor.get(label)
        extra = f"{f:>9.2f}{secs / f:>9.1f}" if f else f"{'':>18}"
        print(f"  {label:<38}{secs:>9.2f}{100 * secs / total:>7.1f}%{extra}  {work.get(label, '')}")
    helper = eng["cpu_seconds"] - eng["main_thread_cpu_seconds"]
    print(f"  {'read-ahead thread (beside the above)':<38}{helper:>9.2f}{'':>8}{'':>18}  CPU-s of the process's other "
          "threads: the inputs' reads and hashes (nufilt_core/readahead.py), not profiled")
    print(f"  {'sum of the floors':<38}{sum(floor.values()):>9.2f}{100 * sum(floor.values()) / total:>7.1f}%  "
          f"(compute {sum(v for k, v in floor.items() if 'GFLOP' in work[k]):.2f} s)")
    print(f"this machine, one thread ({w.matrices} filtered matrices; speeds measured on the largest, "
          f"{rates['shape']}): matmul {rates['gflops_fp32']:.0f} GFLOP/s fp32, {rates['gflops_fp64']:.0f} fp64; "
          f"one full fp64 eigh {rates['eigh_seconds'] * 1e3:.0f} ms (= {rates['eigh_floor_gflops']:.0f} GFLOP/s "
          f"at the top-r_p floor's count), its reduction to tridiagonal form alone "
          f"{rates['tridiagonal_seconds'] * 1e3:.0f} ms (LAPACK syevr for one pair, SciPy's OpenBLAS); the "
          f"engine's: top r_p by syevr {rates['syevr_rp_seconds'] * 1e3:.0f} ms, top r_v by subspace iteration "
          f"{rates['subspace_rv_seconds'] * 1e3:.0f} ms; sha256 "
          f"{rates['sha256_gbs']:.2f} GB/s, finite check {rates['finite_gbs']:.1f} GB/s; read "
          f"{rates['read_cache_gbs']:.1f} GB/s (page cache), "
          f"{rates['read_disk_gbs']:.2f} GB/s (disk, O_DIRECT); write + fsync {rates['write_gbs']:.2f} GB/s")
    return floor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="vit-b-32", help="vit-b-32, vit-b-16, vit-l-14, vit-tiny")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="the profile's clock")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--machine", nargs=3, type=Path, metavar=("BASE", "PREVIOUS", "SCRATCH"),
                    help=argparse.SUPPRESS)  # the child that measures this machine
    args = ap.parse_args(argv)
    if args.machine:
        report(**measure_machine(*args.machine))
        return 0

    models = ensure_models(args.shape, 2, args.seed)
    work = CACHE / f"{args.shape}-s{args.seed}"
    merged1 = work / "merged-1"
    if not merged1.exists():  # as nufilt_step.py: the engine's step-1 output, made once
        print(f"step 1 (engine, once): {merged1}", file=sys.stderr)
        run_child(engine_args(models["base"], models["ft-1"], merged1, None, "cpu", []), 1)
    out, stats = work / "merged-2-profile", work / "profile-2.stats"
    step = engine_args(models["base"], models["ft-2"], out, merged1, "cpu", [])
    plain = run_child(step, 1)
    plain_sha = LineageRecord.read(out).model_sha256
    eng = run_child([*step, "--profile", str(stats), "--clock", args.clock], 1)
    assert LineageRecord.read(out).model_sha256 == plain_sha, "the profiled step wrote other bytes"
    rates = run_child(["--machine", str(models["base"]), str(merged1), str(work)], 1, script="profile_step.py")
    total, rows = breakdown(Profile(stats))
    w = count_work(models["base"], merged1, models["ft-2"], folder_bytes(out))
    print(f"shape {args.shape}: base + previous + checkpoint = {gb(w.read_bytes / 2)} on disk; output sha256 "
          f"{plain_sha[:16]}…")
    floor = print_report(eng, plain, total, rows, w, rates, args.clock)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "plain": plain, "profiled": eng, "total": total,
                                         "rows": dict(rows), "floors": floor, "machine": rates,
                                         "work": w.__dict__, "output_sha256": plain_sha}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
