"""NUFILT's named settings, composed from the paper's method and two post-steps.

  paper     the paper's method (what the parity tests check against the published code)
  plus      every Linear weight filtered, the other float tensors averaged, r_p = 32, and the merged task
            vector of each matrix rescaled with a trust radius of 0.03‖W0‖ (trust_radius.py)
  plus-iso  plus, then a flat spectrum on the matrices the rescaling shrank (flat_spectrum.py); a matrix
            that arrives as a LoRA adapter's factors is filtered two-sided at the mean-norm target instead
            (adapter_arrivals): the default, each part chosen on the quality benchmark's dev split of its
            regime (bench/quality/README.md)
Explicit settings override a profile's.
"""

from __future__ import annotations

from typing import Any, Literal

Profile = Literal["paper", "plus", "plus-iso"]
DEFAULT_PROFILE: Profile = "plus-iso"

PLUS: dict[str, Any] = {"preset": "all-linear", "policy": "average", "trust_radius": 0.03, "null_rank": 32}
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "plus": PLUS,
    "plus-iso": {**PLUS, "flat_spectrum": True, "adapter_arrivals": "two-sided"},
}
