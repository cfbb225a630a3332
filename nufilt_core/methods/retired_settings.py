"""NUFILT settings that lost on the quality benchmark, or were never measured, and were removed.

Lineage records hold every setting a step used, so records written before the removal name them. Such a
record still loads when each removed setting is at the value that did nothing (or in the form a kept
setting took over: `rescale = "matrix"` with `rescale_radius` is `trust_radius`, a flat spectrum where
shrunk is `flat_spectrum`); any other value is refused, naming it: the lineage was merged with a rule
this version no longer computes, so it cannot be continued here.
"""

from __future__ import annotations

from typing import Any

# removed setting → the value at which it changed nothing
INERT = {"rescale_growth": 0.0, "adapter_span": False, "null_energy": None, "task_energy": None,
         "calibrate_overlap": False, "smooth_tau": None, "layer_scale": None}
_ABSENT = object()


def translate(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with removed settings dropped or mapped onto the kept ones; ValueError naming any that mattered."""
    if not any(k in data for k in (*INERT, "rescale", "rescale_radius", "spectrum_power", "spectrum_when")) \
            and data.get("policy") != "sum":
        return data
    out = dict(data)
    used = [f"{k} = {out.pop(k)!r}" for k in INERT if k in out and out[k] != INERT[k]]
    for k in INERT:
        out.pop(k, None)
    rescale, radius = out.pop("rescale", _ABSENT), out.pop("rescale_radius", _ABSENT)
    if rescale == "none":
        out["trust_radius"] = None
    elif rescale == "matrix" or (rescale is _ABSENT and radius is not _ABSENT):
        out["trust_radius"] = 0.0 if radius is _ABSENT else radius
    elif rescale is not _ABSENT:
        used.append(f"rescale = {rescale!r}")
    power, when = out.pop("spectrum_power", _ABSENT), out.pop("spectrum_when", _ABSENT)
    if power is None:
        out["flat_spectrum"] = False
    elif power == 0 and when == "shrunk":
        out["flat_spectrum"] = True
    elif power is not _ABSENT:
        used.append(f"spectrum_power = {power!r} with spectrum_when = {'always' if when is _ABSENT else when!r}")
    if out.get("policy") == "sum":
        used.append("policy = 'sum'")
    if used:
        raise ValueError(f"NUFILT no longer has {'; '.join(used)} (removed after losing on the quality benchmark): "
                         f"a lineage merged with it cannot be continued by this version; start a new lineage "
                         f"(step 1) with a profile (paper, plus or plus-iso)")
    return out
