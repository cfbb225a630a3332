"""Which tensors go through which path.

Three kinds of tensor:
- *filtered*: 2-D weights whose name matches the NUFILT include patterns (the published code
  filters CLIP's attention projections and mlp.fc1 only);
- *linear*: every 2-D float weight that is not an embedding or output head (what OPCM and WUDI
  treat as an `nn.Linear` weight, as FusionBench does);
- everything else: 1-D/0-D floats (biases, norms) go through each method's element-wise rule;
  integer and bool buffers are copied from the base and never merged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Presets: the attention projections plus the first MLP matrix ("fc1"), as the paper's code.
PRESETS: dict[str, tuple[str, ...]] = {
    # HF CLIP (self_attn.{q,k,v,out}_proj, mlp.fc1) and OpenCLIP (attn.in_proj_weight, attn.out_proj, mlp.c_fc)
    "clip": (r"attn", r"\.fc1\.", r"\.c_fc\."),
    # HF ViT
    "vit": (r"attention\.attention\.(query|key|value)\.", r"attention\.output\.dense\.", r"intermediate\.dense\."),
    # HF BERT / RoBERTa / MiniLM
    "bert": (r"attention\.self\.(query|key|value)\.", r"attention\.output\.dense\.", r"intermediate\.dense\."),
    # T5 / Flan-T5, as the paper's code for Flan-T5
    "t5": (r"SelfAttention", r"EncDecAttention", r"DenseReluDense"),
    # Llama-style decoders: attention and the gate/up projections
    "llama": (r"self_attn\.(q|k|v|o)_proj\.", r"mlp\.(gate|up)_proj\."),
}
# How `auto` recognises an architecture: a name that only that family uses.
SIGNATURES: tuple[tuple[str, str], ...] = (
    ("t5", r"SelfAttention"),
    ("llama", r"mlp\.gate_proj\."),
    ("vit", r"attention\.attention\.query\."),
    ("bert", r"attention\.self\.query\."),
    ("clip", r"(self_)?attn\.(q_proj|in_proj)"),
)
# 2-D weights that are lookup tables or output heads, not Linear layers.
NOT_LINEAR = re.compile(
    r"(embed|embedding|wte|wpe|lm_head|classifier|\bhead\b|pooler|shared\.weight|position|token_type"
    r"|class_embedding|logit_scale)", re.IGNORECASE)


def is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    return len(shape) == 2 and name.endswith("weight") and not NOT_LINEAR.search(name)


def detect_preset(names: Iterable[str]) -> str | None:
    names = list(names)
    for preset, signature in SIGNATURES:
        rx = re.compile(signature)
        if any(rx.search(n) for n in names):
            return preset
    return None


@dataclass(frozen=True)
class Selection:
    """The resolved NUFILT include patterns for one model."""

    patterns: tuple[str, ...]
    source: str  # "preset:bert", "user", or "default:all-linear"

    @classmethod
    def resolve(cls, names: Iterable[str], include: Sequence[str] = (), preset: str = "auto") -> Selection:
        if include:
            for p in include:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"--include {p!r} is not a valid regular expression: {e}") from e
            return cls(tuple(include), "user")
        if preset == "auto":
            found = detect_preset(names)
            if found is None:
                return cls((), "default:all-linear")
            preset = found
        if preset == "all-linear":
            return cls((), "default:all-linear")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from auto, all-linear, {', '.join(PRESETS)}")
        return cls(PRESETS[preset], f"preset:{preset}")

    def is_filtered(self, name: str, shape: Sequence[int], is_float: bool = True) -> bool:
        if not is_float or len(shape) != 2:
            return False
        if not self.patterns:  # unknown architecture: every Linear weight
            return is_linear_weight(name, shape)
        return any(re.search(p, name) for p in self.patterns)
