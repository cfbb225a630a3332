"""What gets merged: each variant is a registered nufilt_core method plus explicit settings.

Main variants run over every task order; the NUFILT settings study (first-step rule, which
tensors are filtered, policy for the rest) runs over the first few orders only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nufilt_core.methods import METHODS
from nufilt_core.methods.nufilt import PROFILES


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    group: str = "method"  # "method", "ablation", "settings", "lever"
    label: str = ""

    def __hash__(self) -> int:
        return hash(self.name)


# The paper's Table 4: (1) naive = θ_{t-1}^m + τ_t, (2) null-space only, (3) adapter only, full method.
ABLATIONS = (
    Variant("naive", "task_arithmetic", {"scale": 1.0}, "ablation", "(1) naive merging, θ^m + τ_t"),
    Variant("nufilt_null_only", "nufilt", {"lora_rank": 0}, "ablation", "(2) null-space only (r_l = 0)"),
    Variant("nufilt_adapter_only", "nufilt", {"null_space": False}, "ablation", "(3) adapter only (P = I)"),
)
# BERT's 2-D body weights are q/k/v, attention.output.dense, intermediate.dense and output.dense;
# the "bert" preset filters all but output.dense, so "all-linear" = bert + output.dense here.
SETTINGS = (
    Variant("nufilt_first_published", "nufilt", {"first_step": "published_code"}, "settings",
            "first_step = published_code"),
    Variant("nufilt_all_linear", "nufilt", {"preset": "all-linear"}, "settings",
            "preset = all-linear (adds FFN output.dense)"),
    Variant("nufilt_keep_previous", "nufilt", {"policy": "keep_previous"}, "settings", "policy = keep_previous"),
    Variant("nufilt_average", "nufilt", {"policy": "average"}, "settings", "policy = average"),
)


# Beyond the paper (issue 9): levers the diagnosis points to, alone and combined. The whole grid
# was screened on the dev split (DEV_TASKS, orders 0–2; `--only`); FULL_RUN_LEVERS are the rows
# every preset's full run reports (the chosen combination, its parts, and the rescaling alone).
LEVER_GRID = (
    Variant("nufilt_rescale_model", "nufilt", {"rescale": "model"}, "lever",
            "rescale the merged task vector, OPCM's λ_t over the model"),
    Variant("nufilt_rescale_matrix", "nufilt", {"rescale": "matrix"}, "lever",
            "rescale per matrix (OPCM's λ_t rule, one λ per matrix)"),
    Variant("nufilt_rescale_sqrt", "nufilt", {"rescale": "matrix", "rescale_growth": 0.5}, "lever",
            "rescale per matrix to mean ‖τ_i‖·√t (the size of t orthogonal task vectors)"),
    Variant("nufilt_radius03", "nufilt", {"rescale": "matrix", "rescale_radius": 0.03}, "lever",
            "rescale per matrix, never below a trust radius 0.03‖W0‖"),
    Variant("nufilt_radius05", "nufilt", {"rescale": "matrix", "rescale_radius": 0.05}, "lever",
            "rescale per matrix, never below a trust radius 0.05‖W0‖"),
    Variant("nufilt_radius08", "nufilt", {"rescale": "matrix", "rescale_radius": 0.08}, "lever",
            "rescale per matrix, never below a trust radius 0.08‖W0‖"),
    Variant("nufilt_rp64", "nufilt", {"null_rank": 64}, "lever", "r_p = 64"),
    Variant("nufilt_rp32", "nufilt", {"null_rank": 32}, "lever", "r_p = 32"),
    Variant("nufilt_energy50", "nufilt", {"null_energy": 0.5}, "lever",
            "r_p by energy: the directions holding 50 % of ‖τ_≤t−1‖² (at most 128)"),
    Variant("nufilt_adapter_span", "nufilt", {"adapter_span": True}, "lever",
            "adapter confined to span([V̂t, V̂p]), the directions its loss sees"),
    Variant("nufilt_sum", "nufilt", {"policy": "sum"}, "lever",
            "policy sum: biases, norms and FFN output.dense take θ^m + τ_t"),
    Variant("nufilt_all_linear_avg", "nufilt", {"preset": "all-linear", "policy": "average"}, "lever",
            "all-linear filtered, other tensors averaged"),
    Variant("nufilt_all_linear_sum_rescale", "nufilt", {"preset": "all-linear", "policy": "sum", "rescale": "model"},
            "lever", "all-linear filtered, other tensors summed, all rescaled (OPCM's λ_t)"),
    Variant("nufilt_rp32_all_linear_sum_rescale", "nufilt",
            {"preset": "all-linear", "policy": "sum", "rescale": "model", "null_rank": 32}, "lever",
            "r_p = 32, all-linear filtered, other tensors summed, all rescaled"),
    Variant("nufilt_plus_matrix", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.03}, "lever",
            "all-linear, other tensors averaged, trust radius 0.03 per matrix"),
    Variant("nufilt_plus_model", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "model", "rescale_radius": 0.03}, "lever",
            "all-linear, other tensors averaged, trust radius 0.03 over the model"),
    Variant("nufilt_plus_rp32", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.03, "null_rank": 32},
            "lever", "profile plus: all-linear, other tensors averaged, trust radius 0.03 per matrix, r_p = 32"),
    Variant("nufilt_plus_rp16", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.03, "null_rank": 16},
            "lever", "all-linear, other tensors averaged, trust radius 0.03 per matrix, r_p = 16"),
    Variant("nufilt_plus_rp32_model", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "model", "rescale_radius": 0.03, "null_rank": 32},
            "lever", "all-linear, other tensors averaged, trust radius 0.03 over the model, r_p = 32"),
    Variant("nufilt_plus_rp32_r05", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.05, "null_rank": 32},
            "lever", "all-linear, other tensors averaged, trust radius 0.05 per matrix, r_p = 32"),
    *(Variant(f"nufilt_plus_rp32_r{round(r * 100):02d}", "nufilt", {**PROFILES["plus"], "rescale_radius": r}, "lever",
              f"plus with trust radius {r:g} per matrix") for r in (0.01, 0.02)),
    *(Variant(f"nufilt_plus_g{'m' if g < 0 else ''}{abs(round(g * 100))}", "nufilt",
              {**PROFILES["plus"], "rescale_growth": g}, "lever",
              f"plus with the rescale target mean ‖τ_i‖·t^{g:g}") for g in (0.25, 0.5, -0.25, -0.5)),
    Variant("nufilt_all_linear_avg_rp32", "nufilt", {"preset": "all-linear", "policy": "average", "null_rank": 32},
            "lever", "all-linear, other tensors averaged, r_p = 32 (plus without its trust radius)"),
    Variant("nufilt_plus_rv32", "nufilt",
            {"preset": "all-linear", "policy": "average", "rescale": "matrix", "rescale_radius": 0.03, "null_rank": 32,
             "task_rank": 32}, "lever", "plus with r_v = 32 (more of the new task's directions in the adapter's loss)"),
    # the new task vector's low-rank part only (task_energy), on its own and inside the plus profile
    Variant("nufilt_te70", "nufilt", {"task_energy": 0.7}, "lever",
            "low-rank τ_t: its top directions holding 70 % of ‖τ_t‖²"),
    Variant("nufilt_radius03_te70", "nufilt", {"rescale": "matrix", "rescale_radius": 0.03, "task_energy": 0.7},
            "lever", "trust radius 0.03 per matrix, low-rank τ_t (70 % of ‖τ_t‖²)"),
    *(Variant(f"nufilt_plus_te{round(e * 100)}", "nufilt", {**PROFILES["plus"], "task_energy": e}, "lever",
              f"plus with low-rank τ_t: its top directions holding {round(e * 100)} % of ‖τ_t‖²")
      for e in (0.5, 0.7, 0.9)),
    # the merged task vector's spectrum reshaped per matrix, its norm kept (Iso-C's flat spectrum at p = 0)
    Variant("nufilt_plus_iso", "nufilt", {**PROFILES["plus"], "spectrum_power": 0.0}, "lever",
            "plus with a flat spectrum (Iso-C) on every filtered matrix, norm kept"),
    Variant("nufilt_plus_sqrt", "nufilt", {**PROFILES["plus"], "spectrum_power": 0.5}, "lever",
            "plus with the merged task vector's singular values σ → √σ per matrix, norm kept"),
    Variant("nufilt_plus_iso_shrunk", "nufilt", dict(PROFILES["plus-iso"]), "lever",
            "profile plus-iso: plus with a flat spectrum (Iso-C) on the matrices its rescaling shrank"),
    Variant("nufilt_plus_iso_r05", "nufilt", {**PROFILES["plus"], "spectrum_power": 0.0, "rescale_radius": 0.05},
            "lever", "plus with a flat spectrum (Iso-C) and a trust radius 0.05"),
    Variant("nufilt_plus_iso_g25", "nufilt", {**PROFILES["plus"], "spectrum_power": 0.0, "rescale_growth": 0.25},
            "lever", "plus with a flat spectrum (Iso-C) and the rescale target mean ‖τ_i‖·t^0.25"),
    Variant("nufilt_plus_iso_null_only", "nufilt", {**PROFILES["plus-iso"], "lora_rank": 0}, "lever",
            "profile plus-iso without the adapter (r_l = 0): the filtered τ_t alone, then rescaled and flattened"),
    Variant("nufilt_plus_clip", "nufilt", {**PROFILES["plus"], "rescale": "clip"}, "lever",
            "plus reaching its target by clipping the largest singular values (only dominant directions shrink)"),
    Variant("nufilt_radius03_rp64", "nufilt", {"rescale": "matrix", "rescale_radius": 0.03, "null_rank": 64}, "lever",
            "trust radius 0.03 and r_p = 64"),
)


PLUS = "nufilt_plus_rp32"  # its options are nufilt's PROFILES["plus"] (a test keeps them equal)
PLUS_ISO = "nufilt_plus_iso_shrunk"  # PROFILES["plus-iso"]
FULL_RUN_LEVERS = (PLUS, PLUS_ISO, "nufilt_plus_iso", "nufilt_all_linear_avg_rp32", "nufilt_all_linear_avg",
                   "nufilt_rp32", "nufilt_radius03", "nufilt_rescale_model", "nufilt_adapter_span")
LEVERS = tuple(v for v in LEVER_GRID if v.name in FULL_RUN_LEVERS)


def method_variants(methods: list[str] | None = None) -> list[Variant]:
    """Every registered method with its default settings (nufilt first)."""
    names = methods or sorted(METHODS, key=lambda n: (n != "nufilt", n))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    return [Variant(n, n, {}, "method", n) for n in names]


def all_variants(methods: list[str] | None = None, ablations: bool = True, settings: bool = True,
                 levers: bool = True, only: list[str] | None = None) -> list[Variant]:
    out = method_variants(methods)
    if ablations and "nufilt" in METHODS:
        out += list(ABLATIONS)
    if settings and "nufilt" in METHODS:
        out += list(SETTINGS)
    if levers and "nufilt" in METHODS:
        out += list(LEVERS)
    if only:
        known = {v.name: v for v in (*method_variants(), *ABLATIONS, *SETTINGS, *LEVER_GRID)}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
        out = [known[n] for n in only]
    return out
