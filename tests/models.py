"""Tiny random models written as real safetensors files, shaped like a 2-layer BERT, and read back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, FFN, LAYERS = 16, 32, 2


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": torch.randn(50, HIDDEN, generator=g),
        "embeddings.LayerNorm.weight": torch.ones(HIDDEN),
        "embeddings.LayerNorm.bias": torch.zeros(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            state[p + f"attention.self.{m}.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) / 4
            state[p + f"attention.self.{m}.bias"] = torch.randn(HIDDEN, generator=g) / 10
        state[p + "attention.output.dense.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) / 4
        state[p + "attention.output.dense.bias"] = torch.randn(HIDDEN, generator=g) / 10
        state[p + "intermediate.dense.weight"] = torch.randn(FFN, HIDDEN, generator=g) / 4
        state[p + "intermediate.dense.bias"] = torch.randn(FFN, generator=g) / 10
        state[p + "output.dense.weight"] = torch.randn(HIDDEN, FFN, generator=g) / 4
        state[p + "output.LayerNorm.weight"] = torch.ones(HIDDEN)
    state = {k: v.to(dtype) for k, v in state.items()}
    state["embeddings.position_ids"] = torch.arange(8, dtype=torch.int64).unsqueeze(0)
    return state


def finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fake fine-tune: low-rank-ish task vectors on matrices, small noise elsewhere."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif v.ndim == 2:
            u = torch.randn(v.shape[0], 3, generator=g)
            w = torch.randn(3, v.shape[1], generator=g)
            out[k] = (v.float() + scale * (u @ w + 0.1 * torch.randn(v.shape, generator=g))).to(v.dtype)
        else:
            out[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
    return out


def write_model(state: dict[str, torch.Tensor], folder: Path, shards: int = 1, config: bool = True) -> Path:
    """Write `state` as model.safetensors, or as `shards` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": HIDDEN}))
    return folder


def load(folder: Path) -> dict[str, torch.Tensor]:
    """Read a model back with the safetensors library itself (an independent reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
