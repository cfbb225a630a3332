"""`nufilt demo DIR`: a small base model and fine-tuned checkpoints to try nufilt with.

Nothing can be downloaded at run time, so the quick start makes its own models: a 4-layer
BERT-shaped encoder (HF names, hidden 128) and fine-tunes whose task vectors are low-rank plus
noise, as real fine-tunes are. Only for trying the tools: they are random weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, FFN, LAYERS, VOCAB = 128, 512, 4, 1000


def demo_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {"embeddings.word_embeddings.weight": rand(VOCAB, HIDDEN),
             "embeddings.LayerNorm.weight": torch.ones(HIDDEN), "embeddings.LayerNorm.bias": torch.zeros(HIDDEN)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        shapes = {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                  "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
                  "intermediate.dense": (FFN, HIDDEN), "output.dense": (HIDDEN, FFN)}
        for module, shape in shapes.items():
            state[f"{p}{module}.weight"] = rand(*shape)
            state[f"{p}{module}.bias"] = torch.zeros(shape[0])
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[f"{p}{norm}.weight"] = torch.ones(HIDDEN)
            state[f"{p}{norm}.bias"] = torch.zeros(HIDDEN)
    return state


def demo_finetune(base: dict[str, torch.Tensor], task: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + task)
    out = {}
    for name, value in base.items():
        if value.ndim == 2 and "embeddings" not in name:
            u, v = torch.randn(value.shape[0], rank, generator=g), torch.randn(rank, value.shape[1], generator=g)
            delta = 0.002 * (u @ v) + 0.0005 * torch.randn(value.shape, generator=g)
        else:
            delta = 0.001 * torch.randn(value.shape, generator=g)
        out[name] = value + delta
    return out


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_demo(directory: Path, tasks: int = 3, seed: int = 0) -> list[Path]:
    config = {"model_type": "bert", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "note": "nufilt demo"}
    base = demo_base(seed)
    written = []
    for name, state in [("base", base)] + [(f"task-{t}", demo_finetune(base, t)) for t in range(1, tasks + 1)]:
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(folder / "model.safetensors", 0o666 & ~current_umask())  # safetensors writes 0600
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append(folder)
    return written


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write a small base model and fine-tuned checkpoints to try nufilt with",
                       description="Write DIR/base and DIR/task-1..N: a small random BERT-shaped model and "
                       "fine-tunes of it (safetensors + config.json). For trying the tools only.")
    p.add_argument("directory", type=Path)
    p.add_argument("--tasks", type=int, default=3, help="number of fine-tuned checkpoints (3)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    for folder in write_demo(args.directory, args.tasks, args.seed):
        print(folder)
    return 0
