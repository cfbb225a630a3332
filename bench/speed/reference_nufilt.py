"""A straightforward NUFILT step, following the published loop structure — the yardstick of the speed benchmark.

Written the way the authors' code (zihuanqiu/NUFILT, fusion_bench/models/filter_lora.py and
method/nufilt/nufilt.py) and the paper's Algorithm 1 are laid out, without our engine's shortcuts:
  * all three models loaded whole into memory;
  * full (thin) SVDs with `torch.linalg.svd` of τ_{≤t-1} and τ_t for every selected matrix;
  * P = I − V̂p V̂pᵀ materialised as a d_in × d_in matrix;
  * one Adam over every layer's A and B (the published `solve_lora`), and in every one of its
    iterations each layer's loss is rebuilt from scratch. `variant="paper"` recomputes
    M = τ_{≤t-1} + τ_t P, 𝒯 and (M + τ_t B A) V̂ in full, as Algorithm 1 writes it;
    `variant="published"` recomputes them the way `FilterLoRA.solve_lora` does (through M V̂,
    without forming M), which is cheaper and a fairer yardstick for the engine's speed-up;
  * fuse: W_t^m = W_{t-1}^m + τ_t (P + B A), P again d_in × d_in.
Inputs that decide the numbers are the engine's: the tensor selection (`Selection`), the adapter
seed (`adapter_seed`, `seeded_normal`), and the rule that zero singular values never count as
earlier-task directions. This module lives in bench/ and is never imported by the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from nufilt_core.linalg import adapter_seed, seeded_normal
from nufilt_core.methods.nufilt import ADAPTER_INIT_SCALE, NufiltSettings, paper_loss
from nufilt_core.selection import Selection

Variant = Literal["paper", "published"]


@dataclass
class ReferenceSettings:
    null_rank: int = 128
    lora_rank: int = 64
    task_rank: int = 8
    iters: int = 50
    lr: float = 1e-3
    lambda_new: float = 1.0
    lambda_old: float = 1.0


def load_model(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (model.safetensors) or file, in memory — the straightforward way."""
    path = Path(path)
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))


def full_svd_top_right(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Top right singular vectors [d_in, k] from the full thin SVD; zero singular values are dropped."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    tol = s.max() * max(x.shape) * torch.finfo(x.dtype).eps
    k = min(rank, int((s > tol).sum()))
    return vh[:k].T


class FilteredLayer:
    """One selected matrix during the step: the published FilterLoRA, without the nn.Module wrapping."""

    def __init__(self, name: str, w_prev: torch.Tensor, tau_prev: torch.Tensor, tau_new: torch.Tensor,
                 seed: int, step: int, s: ReferenceSettings):
        self.name = name
        self.w_prev, self.tau_prev, self.tau_new = w_prev, tau_prev, tau_new
        d_in = tau_new.shape[1]
        self.v_prev = full_svd_top_right(tau_prev, s.null_rank)
        self.v_new = full_svd_top_right(tau_new, s.task_rank)
        self.p = torch.eye(d_in) - self.v_prev @ self.v_prev.T
        self.a = (seeded_normal((s.lora_rank, d_in), adapter_seed(seed, name, step))
                  * ADAPTER_INIT_SCALE).requires_grad_(True)
        self.b = torch.zeros(d_in, s.lora_rank, requires_grad=True)
        self.s = s
        self.paper_settings = NufiltSettings(lambda_new=s.lambda_new, lambda_old=s.lambda_old)

    def loss_paper(self) -> torch.Tensor:
        """Algorithm 1 as printed: M, 𝒯, V̂ and the loss rebuilt from the full matrices (nufilt.paper_loss)."""
        return paper_loss(self.tau_prev, self.tau_new, self.a, self.b, self.v_prev, self.v_new, self.paper_settings)

    def loss_published(self) -> torch.Tensor:
        """As FilterLoRA.solve_lora: each block's M V recomputed as prev V + T (V − U Uᵀ V) every call."""
        loss = torch.zeros(())
        for lam, v, target_of in ((self.s.lambda_new, self.v_new, self.tau_new),
                                  (self.s.lambda_old, self.v_prev, self.tau_prev)):
            if v.shape[1] == 0 or lam == 0.0:
                continue
            target = target_of @ v
            p_v = v - self.v_prev @ (self.v_prev.T @ v)
            residual = target - (self.tau_prev @ v + self.tau_new @ p_v)
            r = residual - self.tau_new @ (self.b @ (self.a @ v))
            loss = loss + lam * (r * r).sum()
        return loss

    def fused(self) -> torch.Tensor:
        return self.w_prev + self.tau_new @ (self.p + self.b.detach() @ self.a.detach())


def reference_step(base: Path, previous: Path, new: Path, *, seed: int, step: int,
                   settings: ReferenceSettings | None = None, variant: Variant = "paper",
                   preset: str = "auto") -> dict[str, torch.Tensor]:
    """The merged value of every selected matrix (step ≥ 2: `previous` is a merged model)."""
    s = settings or ReferenceSettings()
    w0, wp, wn = load_model(base), load_model(previous), load_model(new)
    selection = Selection.resolve(list(w0), (), preset)
    names = [n for n, t in w0.items() if t.is_floating_point() and selection.is_filtered(n, tuple(t.shape))]
    layers = [FilteredLayer(n, wp[n].float(), (wp[n] - w0[n]).float(), (wn[n] - w0[n]).float(), seed, step, s)
              for n in names]
    if s.lora_rank > 0 and s.iters > 0 and layers:
        opt = torch.optim.Adam([p for layer in layers for p in (layer.a, layer.b)], lr=s.lr)
        for _ in range(s.iters):
            loss = sum(layer.loss_paper() if variant == "paper" else layer.loss_published() for layer in layers)
            loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        return {layer.name: layer.fused() for layer in layers}
