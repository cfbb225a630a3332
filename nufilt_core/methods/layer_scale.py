"""A per-layer scale on each arriving task vector (a lever studied on the quality benchmark's dev split).

After LARV's tiered schedule (arXiv 2602.09413: data-free per-layer scales, shallow layers suppressed where tasks
interfere, deep ones amplified where task features are stable): the model's blocks are cut into thirds by depth,
and τ_t of every tensor in a block of the first, middle and last third is multiplied by the tier's factor before it
is merged. Tensors outside the numbered blocks (embeddings, heads, a final norm) keep τ_t as it is. With a rescaling
post-step every task vector of a layer is scaled alike, so the mean-norm target it rescales to moves with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# the block number in the tensor names of the common architectures: BERT's `encoder.layer.3.`, Llama's
# `model.layers.3.`, GPT-2's `h.3.`, ViT's `blocks.3.` / `resblocks.3.`, T5's `block.3.`
BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|resblocks|block)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block a tensor belongs to, from its name (the last numbered block: an encoder-decoder's own), or None."""
    found = BLOCK.findall(name)
    return int(found[-1]) if found else None


def layer_scales(names: Sequence[str], tiers: tuple[float, float, float]) -> dict[str, float]:
    """The factor of every tensor inside a numbered block: tiers[k] for blocks in the k-th third by depth."""
    blocks = {n: b for n in names if (b := block_index(n)) is not None}
    if not blocks:
        return {}
    depth = max(blocks.values()) + 1
    return {n: tiers[min(2, 3 * b // depth)] for n, b in blocks.items()}
