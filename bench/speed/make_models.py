"""Write synthetic models with real HF tensor names as safetensors for the speed benchmarks.

Two families: CLIP-ViT-shaped (HF `CLIPVisionModel` names, fp32, one file) and Llama-shaped
decoders (HF `LlamaForCausalLM` names, bf16, sharded with `model.safetensors.index.json` as
`save_pretrained` writes them; tied or untied embeddings).

A base θ0 plus fine-tunes θ_k = θ0 + τ_k. Each task vector of a matrix looks like a real one:
low-rank-dominant (rank 32, power-law singular values) plus dense noise, about 2 % of the
weight's norm; 1-D tensors get small dense noise. Every tensor comes from its own generator
seeded by (seed, model, tensor name), so a model is generated and written one tensor at a
time (the ViT-L/14 files are 1.2 GB each, a 1B Llama 2.2 GB) and the same command always
writes the same bytes. Values are drawn in fp32 and rounded to the shape's dtype last.

    .venv/bin/python bench/speed/make_models.py --shape vit-b-32 --finetunes 2
    .venv/bin/python bench/speed/make_models.py --shape llama-tiny [--tied]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nufilt_core.safetensors_io import DTYPE_NAMES, StreamingWriter

CACHE = Path(__file__).resolve().parents[1] / "cache"
TASK_RANK = 32  # rank of the dominant part of a synthetic task vector
TASK_SCALE = 0.02  # ‖τ‖ / ‖W‖ for matrices
NOISE_SHARE = 0.3  # ‖noise‖ / ‖low-rank part‖
MiB = 1024**2

Plan = list[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class VitShape:
    name: str
    layers: int
    hidden: int
    mlp: int
    patch: int
    image: int = 224
    shard_bytes: int | None = None  # one model.safetensors, as open_clip/HF ship these

    @property
    def positions(self) -> int:
        return (self.image // self.patch) ** 2 + 1  # patches + class token

    @property
    def key(self) -> str:
        return self.name

    def plan(self) -> Plan:
        """Every tensor of a HF CLIPVisionModel state dict, in its order."""
        h, m = self.hidden, self.mlp
        p = "vision_model."
        plan: Plan = [
            (p + "embeddings.class_embedding", (h,), torch.float32),
            (p + "embeddings.patch_embedding.weight", (h, 3, self.patch, self.patch), torch.float32),
            (p + "embeddings.position_embedding.weight", (self.positions, h), torch.float32),
            (p + "embeddings.position_ids", (1, self.positions), torch.int64),
            (p + "pre_layrnorm.weight", (h,), torch.float32),  # sic: HF's spelling
            (p + "pre_layrnorm.bias", (h,), torch.float32),
        ]
        for i in range(self.layers):
            lp = f"{p}encoder.layers.{i}."
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                plan += [(f"{lp}self_attn.{proj}.weight", (h, h), torch.float32),
                         (f"{lp}self_attn.{proj}.bias", (h,), torch.float32)]
            plan += [(lp + "layer_norm1.weight", (h,), torch.float32), (lp + "layer_norm1.bias", (h,), torch.float32),
                     (lp + "mlp.fc1.weight", (m, h), torch.float32), (lp + "mlp.fc1.bias", (m,), torch.float32),
                     (lp + "mlp.fc2.weight", (h, m), torch.float32), (lp + "mlp.fc2.bias", (h,), torch.float32),
                     (lp + "layer_norm2.weight", (h,), torch.float32), (lp + "layer_norm2.bias", (h,), torch.float32)]
        plan += [(p + "post_layernorm.weight", (h,), torch.float32), (p + "post_layernorm.bias", (h,), torch.float32)]
        return plan

    def config(self) -> dict:
        return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
                "hidden_size": self.hidden, "intermediate_size": self.mlp, "num_hidden_layers": self.layers,
                "num_attention_heads": self.hidden // 64, "patch_size": self.patch, "image_size": self.image,
                "torch_dtype": "float32", "_synthetic": "bench/speed/make_models.py"}


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-style decoder (RMSNorm, SwiGLU MLP, grouped-query attention, no biases) in bf16."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int  # < heads: grouped-query attention, k/v_proj are (kv_heads * head_dim) × hidden
    vocab: int
    full_layers: int  # depth of the real model this shape stands for (for a per-layer extrapolation)
    shard_bytes: int  # max shard size of the written files: small enough that every shape gets an index
    tied: bool = False  # lm_head shares model.embed_tokens.weight, so the files hold no lm_head.weight
    dtype: torch.dtype = torch.bfloat16

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def key(self) -> str:
        return self.name + ("-tied" if self.tied else "")

    def plan(self) -> Plan:
        """Every tensor of a HF LlamaForCausalLM state dict, in its order."""
        h, i, kv, dt = self.hidden, self.intermediate, self.kv_dim, self.dtype
        plan: Plan = [("model.embed_tokens.weight", (self.vocab, h), dt)]
        for n in range(self.layers):
            lp = f"model.layers.{n}."
            plan += [(lp + "self_attn.q_proj.weight", (h, h), dt), (lp + "self_attn.k_proj.weight", (kv, h), dt),
                     (lp + "self_attn.v_proj.weight", (kv, h), dt), (lp + "self_attn.o_proj.weight", (h, h), dt),
                     (lp + "mlp.gate_proj.weight", (i, h), dt), (lp + "mlp.up_proj.weight", (i, h), dt),
                     (lp + "mlp.down_proj.weight", (h, i), dt),
                     (lp + "input_layernorm.weight", (h,), dt), (lp + "post_attention_layernorm.weight", (h,), dt)]
        plan.append(("model.norm.weight", (h,), dt))
        if not self.tied:
            plan.append(("lm_head.weight", (self.vocab, h), dt))
        return plan

    def config(self) -> dict:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "tie_word_embeddings": self.tied, "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                "torch_dtype": str(self.dtype).removeprefix("torch."), "_synthetic": "bench/speed/make_models.py"}


Shape = VitShape | LlamaShape

SHAPES: dict[str, Shape] = {
    "vit-b-32": VitShape("vit-b-32", layers=12, hidden=768, mlp=3072, patch=32),
    "vit-b-16": VitShape("vit-b-16", layers=12, hidden=768, mlp=3072, patch=16),
    "vit-l-14": VitShape("vit-l-14", layers=24, hidden=1024, mlp=4096, patch=14),
    # small enough for a test or a quick CPU/CUDA parity check, yet d_in > r_p = 128 so P is not 0
    "vit-tiny": VitShape("vit-tiny", layers=2, hidden=192, mlp=768, patch=16, image=32),
    # TinyLlama-1.1B's shape (GQA: 32 heads, 4 KV heads, so k/v_proj are 256 × 2048): 2.2 GB, 3 shards
    "llama-1b": LlamaShape("llama-1b", layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4,
                           vocab=32000, full_layers=22, shard_bytes=1024 * MiB),
    # Llama-2-7B's layer shape (full-width k/v) with 2 of its 32 layers: 1.3 GB, 3 shards
    "llama-7b-wide": LlamaShape("llama-7b-wide", layers=2, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                                vocab=32000, full_layers=32, shard_bytes=512 * MiB),
    # for tests and smoke runs: 4 MB, 5 shards; hidden > r_p = 128 so P is not 0; GQA as llama-1b
    "llama-tiny": LlamaShape("llama-tiny", layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2,
                             vocab=1000, full_layers=2, shard_bytes=MiB),
}


def get_shape(name: str, tied: bool = False) -> Shape:
    shape = SHAPES[name]
    if tied:
        if not isinstance(shape, LlamaShape):
            raise ValueError(f"--tied: {name} has no output head to tie")
        shape = dataclasses.replace(shape, tied=True)
    return shape


def tensor_plan(shape: Shape) -> Plan:
    return shape.plan()


def generator(seed: int, model: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{model}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def base_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if not dtype.is_floating_point:  # position_ids
        return torch.arange(shape[-1], dtype=dtype).reshape(shape)
    g = generator(seed, "base", name)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)  # weights of a trained net are about this size


def task_vector(name: str, weight: torch.Tensor, seed: int, task: int) -> torch.Tensor:
    """A synthetic τ for one tensor: low-rank-dominant plus noise for matrices, small noise otherwise."""
    g = generator(seed, f"task-{task}", name)
    if weight.ndim != 2:
        return 1e-3 * weight.abs().mean() * torch.randn(weight.shape, generator=g)
    d_out, d_in = weight.shape
    r = min(TASK_RANK, d_out, d_in)
    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)  # power-law spectrum, as real task vectors have
    low = (torch.randn(d_out, r, generator=g) * s) @ torch.randn(r, d_in, generator=g)
    noise = torch.randn(d_out, d_in, generator=g)
    # the same expression as `low / low.norm() + NOISE_SHARE * noise / noise.norm()` (same bytes), but
    # rebinding frees each full-size temporary early: a 7B embedding is 0.5 GB per fp32 copy
    low = low / low.norm()
    noise = NOISE_SHARE * noise / noise.norm()
    tau = low + noise
    del low, noise
    return tau * (TASK_SCALE * weight.norm() / tau.norm())


def model_tensors(shape: Shape, seed: int, task: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base (task None) or fine-tune `task`, one tensor at a time."""
    for name, dims, dtype in tensor_plan(shape):
        w = base_tensor(name, dims, dtype, seed)
        if task is not None and dtype.is_floating_point:
            w = w + task_vector(name, w, seed, task)
        yield name, w.to(dtype).contiguous()


def config_json(shape: Shape) -> dict:
    return shape.config()


def write_model(folder: Path, shape: Shape, seed: int, task: int | None) -> Path:
    """Write one model into `folder` (model.safetensors, or shards of at most `shape.shard_bytes` with
    model.safetensors.index.json, + config.json); atomic: temp folder, then rename, so a folder that
    exists is complete."""
    if folder.is_dir():
        return folder
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = [(n, DTYPE_NAMES[dt], dims) for n, dims, dt in tensor_plan(shape)]
        writer = StreamingWriter(tmp, plan, max_shard_bytes=shape.shard_bytes or 2**62)
        for name, tensor in model_tensors(shape, seed, task):
            writer.write(name, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config_json(shape), indent=2) + "\n")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_models(shape_name: str, finetunes: int = 2, seed: int = 0, root: Path = CACHE,
                  tied: bool = False) -> dict[str, Path]:
    """base/ and ft-1/ … ft-N/ under root/<shape>[-tied]-s<seed>/, written once and reused afterwards."""
    shape = get_shape(shape_name, tied)
    where = root / f"{shape.key}-s{seed}"
    where.mkdir(parents=True, exist_ok=True)
    models = {"base": write_model(where / "base", shape, seed, None)}
    for k in range(1, finetunes + 1):
        models[f"ft-{k}"] = write_model(where / f"ft-{k}", shape, seed, k)
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="vit-b-32")
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=CACHE)
    ap.add_argument("--tied", action="store_true", help="Llama shapes: lm_head tied to the embeddings (not stored)")
    args = ap.parse_args(argv)
    for role, path in ensure_models(args.shape, args.finetunes, args.seed, args.root, args.tied).items():
        files = sorted(path.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"{role:<6} {path}  {size / 1e9:.2f} GB in {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
