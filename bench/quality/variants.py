"""What gets merged: each variant is a registered nufilt_core method plus explicit settings.

Main variants run over every task order; the NUFILT settings study (first-step rule, which
tensors are filtered, policy for the rest) runs over the first few orders only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nufilt_core.methods import METHODS


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    group: str = "method"  # "method", "ablation", "settings", "lever"
    label: str = ""

    def __hash__(self) -> int:
        return hash(self.name)


PAPER: dict[str, Any] = {"profile": "paper"}  # NUFILT as published; the study rows below vary it


# The paper's Table 4: (1) naive = θ_{t-1}^m + τ_t, (2) null-space only, (3) adapter only, full method.
ABLATIONS = (
    Variant("naive", "task_arithmetic", {"scale": 1.0}, "ablation", "(1) naive merging, θ^m + τ_t"),
    Variant("nufilt_null_only", "nufilt", {**PAPER, "lora_rank": 0}, "ablation", "(2) null-space only (r_l = 0)"),
    Variant("nufilt_adapter_only", "nufilt", {**PAPER, "null_space": False}, "ablation",
            "(3) adapter only (P = I)"),
)
# BERT's 2-D body weights are q/k/v, attention.output.dense, intermediate.dense and output.dense;
# the "bert" preset filters all but output.dense, so "all-linear" = bert + output.dense here.
SETTINGS = (
    Variant("nufilt_first_published", "nufilt", {**PAPER, "first_step": "published_code"}, "settings",
            "first_step = published_code"),
    Variant("nufilt_all_linear", "nufilt", {**PAPER, "preset": "all-linear"}, "settings",
            "preset = all-linear (adds FFN output.dense)"),
    Variant("nufilt_keep_previous", "nufilt", {**PAPER, "policy": "keep_previous"}, "settings",
            "policy = keep_previous"),
    Variant("nufilt_average", "nufilt", {**PAPER, "policy": "average"}, "settings", "policy = average"),
)


# Beyond the paper: the profiles and the levers they are made of, alone and combined, chosen on the
# dev split (DEV_TASKS; `--only`). Levers that lost there were removed from NUFILT (bench/quality/README.md
# lists them with their figures). FULL_RUN_LEVERS are the rows every preset's full run reports.
PLUS = "nufilt_plus"
PLUS_ISO = "nufilt_plus_iso"  # the default
# plus-iso as it was before its adapter rule (adapter_arrivals): the base of the levers studied on top of it, so
# that on adapter presets they are measured against the rule they were built for
PLUS_ISO_AS_FULL = {"profile": "plus-iso", "adapter_arrivals": "as-full"}
LEVER_GRID = (
    Variant(PLUS, "nufilt", {"profile": "plus"}, "lever",
            "profile plus: all-linear, other tensors averaged, trust radius 0.03 per matrix, r_p = 32"),
    Variant(PLUS_ISO, "nufilt", {"profile": "plus-iso"}, "lever",
            "profile plus-iso (the default): plus with a flat spectrum on the matrices its rescaling shrank, "
            "adapter arrivals filtered two-sided at the mean-norm target"),
    Variant("nufilt_radius03", "nufilt", {**PAPER, "trust_radius": 0.03}, "lever",
            "rescale per matrix, never below a trust radius 0.03‖W0‖"),
    Variant("nufilt_radius05", "nufilt", {**PAPER, "trust_radius": 0.05}, "lever",
            "rescale per matrix, never below a trust radius 0.05‖W0‖"),
    Variant("nufilt_rp32", "nufilt", {**PAPER, "null_rank": 32}, "lever", "r_p = 32"),
    Variant("nufilt_all_linear_avg", "nufilt", {**PAPER, "preset": "all-linear", "policy": "average"}, "lever",
            "all-linear filtered, other tensors averaged"),
    Variant("nufilt_all_linear_avg_rp32", "nufilt",
            {**PAPER, "preset": "all-linear", "policy": "average", "null_rank": 32}, "lever",
            "all-linear, other tensors averaged, r_p = 32 (plus without its trust radius)"),
    *(Variant(f"nufilt_plus_r{round(r * 100):02d}", "nufilt", {"profile": "plus", "trust_radius": r}, "lever",
              f"plus with trust radius {r:g} per matrix") for r in (0.01, 0.02)),
    Variant("nufilt_plus_iso_as_full", "nufilt", PLUS_ISO_AS_FULL, "lever",
            "plus-iso merging adapter arrivals as full fine-tunes (plus-iso before its adapter rule)"),
    Variant("nufilt_plus_iso_null_only", "nufilt", {**PLUS_ISO_AS_FULL, "lora_rank": 0}, "lever",
            "profile plus-iso without the adapter (r_l = 0): the filtered τ_t alone, then rescaled and flattened"),
    Variant("nufilt_plus_iso_r00", "nufilt", {**PLUS_ISO_AS_FULL, "trust_radius": 0.0}, "lever",
            "plus-iso rescaled to OPCM's target, the mean norm of the task vectors (trust radius 0)"),
    Variant("nufilt_plus_iso_two_sided", "nufilt", {**PLUS_ISO_AS_FULL, "lora_rank": 0, "two_sided_filter": True},
            "lever", "plus-iso without the adapter, filtering only τ_t's part on the earlier singular pairs"),
    Variant("nufilt_plus_iso_two_sided_r00", "nufilt",
            {**PLUS_ISO_AS_FULL, "lora_rank": 0, "two_sided_filter": True, "trust_radius": 0.0}, "lever",
            "the two-sided filter at OPCM's rescale target (trust radius 0)"),
    Variant("nufilt_plus_two_sided_r00", "nufilt",
            {"profile": "plus", "lora_rank": 0, "two_sided_filter": True, "trust_radius": 0.0}, "lever",
            "the two-sided filter at OPCM's rescale target, without the flat spectrum (profile plus)"),
)
FULL_RUN_LEVERS = (PLUS, PLUS_ISO, "nufilt_all_linear_avg_rp32", "nufilt_all_linear_avg", "nufilt_rp32",
                   "nufilt_radius03")
LEVERS = tuple(v for v in LEVER_GRID if v.name in FULL_RUN_LEVERS)


def method_variants(methods: list[str] | None = None) -> list[Variant]:
    """Every registered method with its default settings (nufilt first, with the paper's: the profiles are
    levers beside it)."""
    names = methods or sorted(METHODS, key=lambda n: (n != "nufilt", n))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    return [Variant(n, n, PAPER if n == "nufilt" else {}, "method", n) for n in names]


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
