"""plus-iso's flattening of one matrix (flatten_spectrum) against the fp64 SVD it replaced, side by side.

For each shape, a task-vector-like fp32 matrix (Gaussian with singular values falling over three decades) is
flattened (power 0, every direction the same size, the Frobenius norm kept) by both, alternating, one torch
thread; the medians of --repeat runs are printed with their ratio and the largest relative difference of the
two outputs. The shapes: MiniLM's (the quality benchmark's) and ViT-B/32's. The Gram matrix squares the
condition number, so the difference sits in the weakest directions (σ ≈ 1e-6 σ_1 in these square products),
which fp32 weights themselves fix only to about their rounding noise over σ.

    .venv/bin/python bench/speed/flatten.py               # ≈ 1 min here
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nufilt_core.methods.flat_spectrum import flatten_spectrum

SHAPES = {"minilm attention": (384, 384), "minilm fc1": (1536, 384), "minilm fc2": (384, 1536),
          "vit-b attention": (768, 768), "vit-b fc1": (3072, 768), "vit-b fc2": (768, 3072)}


def svd_flatten(delta: torch.Tensor) -> torch.Tensor:
    """The reference: U Vᵀ from an fp64 SVD, scaled to ‖delta‖_F (the flattening before the Gram matrix)."""
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = sigma > sigma[0] * 1e-7
    flat = torch.ones_like(sigma[keep]) * (sigma.norm() / keep.sum().sqrt())
    return ((u[:, keep] * flat) @ vh[keep]).to(delta.dtype)


def timed(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':<18} {'rows×cols':>10} {'SVD s':>8} {'Gram s':>8} {'SVD/Gram':>9} {'max rel diff':>13}")
    for label, (m, n) in SHAPES.items():
        k = min(m, n)
        x = torch.randn(m, k, generator=g) @ torch.diag(torch.logspace(0, -3, k)) @ torch.randn(k, n, generator=g)
        x = x.float()
        svd_t, gram_t, diff = [], [], 0.0
        for _ in range(args.repeat):
            t1, ref = timed(svd_flatten, x)
            t2, got = timed(flatten_spectrum, x)
            svd_t.append(t1)
            gram_t.append(t2)
            diff = max(diff, float((got.double() - ref.double()).norm() / ref.double().norm()))
        a, b = statistics.median(svd_t), statistics.median(gram_t)
        print(f"{label:<18} {f'{m}×{n}':>10} {a:8.3f} {b:8.3f} {a / b:8.2f}× {diff:13.1e}")


if __name__ == "__main__":
    main()
