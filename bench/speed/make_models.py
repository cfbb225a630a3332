"""Write CLIP-ViT-shaped models (HF `CLIPVisionModel` tensor names) as safetensors for the speed benchmarks.

A base θ0 plus fine-tunes θ_k = θ0 + τ_k. Each task vector of a matrix looks like a real one:
low-rank-dominant (rank 32, power-law singular values) plus dense noise, about 2 % of the
weight's norm; 1-D tensors get small dense noise. Every tensor comes from its own generator
seeded by (seed, model, tensor name), so a model is generated and written one tensor at a
time (the ViT-L/14 files are 1.2 GB each) and the same command always writes the same bytes.

    .venv/bin/python bench/speed/make_models.py --shape vit-b-32 --finetunes 2
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class VitShape:
    name: str
    layers: int
    hidden: int
    mlp: int
    patch: int
    image: int = 224

    @property
    def positions(self) -> int:
        return (self.image // self.patch) ** 2 + 1  # patches + class token


SHAPES = {
    "vit-b-32": VitShape("vit-b-32", layers=12, hidden=768, mlp=3072, patch=32),
    "vit-b-16": VitShape("vit-b-16", layers=12, hidden=768, mlp=3072, patch=16),
    "vit-l-14": VitShape("vit-l-14", layers=24, hidden=1024, mlp=4096, patch=14),
    # small enough for a test or a quick CPU/CUDA parity check, yet d_in > r_p = 128 so P is not 0
    "vit-tiny": VitShape("vit-tiny", layers=2, hidden=192, mlp=768, patch=16, image=32),
}


def tensor_plan(shape: VitShape) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of a HF CLIPVisionModel state dict, in its order."""
    h, m = shape.hidden, shape.mlp
    p = "vision_model."
    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        (p + "embeddings.class_embedding", (h,), torch.float32),
        (p + "embeddings.patch_embedding.weight", (h, 3, shape.patch, shape.patch), torch.float32),
        (p + "embeddings.position_embedding.weight", (shape.positions, h), torch.float32),
        (p + "embeddings.position_ids", (1, shape.positions), torch.int64),
        (p + "pre_layrnorm.weight", (h,), torch.float32),  # sic: HF's spelling
        (p + "pre_layrnorm.bias", (h,), torch.float32),
    ]
    for i in range(shape.layers):
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
    tau = low / low.norm() + NOISE_SHARE * noise / noise.norm()
    return tau * (TASK_SCALE * weight.norm() / tau.norm())


def model_tensors(shape: VitShape, seed: int, task: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base (task None) or fine-tune `task`, one tensor at a time."""
    for name, dims, dtype in tensor_plan(shape):
        w = base_tensor(name, dims, dtype, seed)
        if task is not None and dtype.is_floating_point:
            w = w + task_vector(name, w, seed, task)
        yield name, w.to(dtype).contiguous()


def config_json(shape: VitShape) -> dict:
    return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
            "hidden_size": shape.hidden, "intermediate_size": shape.mlp, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.hidden // 64, "patch_size": shape.patch, "image_size": shape.image,
            "torch_dtype": "float32", "_synthetic": "bench/speed/make_models.py"}


def write_model(folder: Path, shape: VitShape, seed: int, task: int | None) -> Path:
    """Write one model into `folder` (model.safetensors + config.json); atomic: temp folder, then rename."""
    if (folder / "model.safetensors").exists():
        return folder
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = [(n, DTYPE_NAMES[dt], dims) for n, dims, dt in tensor_plan(shape)]
        writer = StreamingWriter(tmp, plan, max_shard_bytes=2**62)
        for name, tensor in model_tensors(shape, seed, task):
            writer.write(name, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config_json(shape), indent=2) + "\n")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def ensure_models(shape_name: str, finetunes: int = 2, seed: int = 0, root: Path = CACHE) -> dict[str, Path]:
    """base/ and ft-1/ … ft-N/ under root/<shape>-s<seed>/, written once and reused afterwards."""
    shape = SHAPES[shape_name]
    where = root / f"{shape_name}-s{seed}"
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
    args = ap.parse_args(argv)
    for role, path in ensure_models(args.shape, args.finetunes, args.seed, args.root).items():
        size = (path / "model.safetensors").stat().st_size
        print(f"{role:<6} {path}  {size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
