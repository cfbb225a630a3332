"""Stage 1: fixed, seeded train/test splits, tokenised once and cached as safetensors.

Per task: deduplicate texts (a text with two labels keeps its first), sort (so the file listing
order cannot matter), shuffle with the seed, take the test set first, then the training set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .cache import atomic_dir
from .config import DataConfig, key
from .tasks import LOADERS


@dataclass
class Split:
    ids: torch.Tensor  # [n, max_length] int64, 0-padded
    lengths: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int, order: torch.Tensor | None = None):
        """(ids, mask, labels) with padding cut to the longest example of each batch."""
        order = torch.arange(len(self)) if order is None else order
        for i in range(0, len(order), size):
            idx = order[i:i + size]
            width = int(self.lengths[idx].max())
            ids = self.ids[idx, :width]
            yield ids, (ids != 0).long(), self.labels[idx]


@dataclass
class TaskData:
    name: str
    classes: list[str]
    train: Split
    test: Split


def split_examples(examples: list[tuple[str, str]], cfg: DataConfig) -> tuple[list, list]:
    seen: dict[str, str] = {}
    for text, label in examples:
        seen.setdefault(text, label)
    items = sorted(seen.items())
    random.Random(cfg.seed).shuffle(items)
    n_test = min(cfg.n_test, int(len(items) * cfg.test_share))
    return items[n_test:n_test + cfg.n_train], items[:n_test]


def task_dir(cache: Path, name: str, cfg: DataConfig) -> Path:
    return cache / "data" / f"{name}-{key(cfg.seed, cfg.n_train, cfg.n_test, cfg.test_share, cfg.max_length)}"


def build_task(cache: Path, name: str, cfg: DataConfig, tok=None) -> Path:
    folder = task_dir(cache, name, cfg)
    if (folder / "meta.json").exists():
        return folder
    from .backbone import tokenizer

    tok = tok or tokenizer()
    train, test = split_examples(LOADERS[name](), cfg)
    classes = sorted({label for _, label in train + test})
    with atomic_dir(folder) as tmp:
        tensors = {}
        for part, items in (("train", train), ("test", test)):
            enc = tok([t for t, _ in items], truncation=True, max_length=cfg.max_length)["input_ids"]
            ids = torch.zeros((len(enc), cfg.max_length), dtype=torch.int32)
            for i, row in enumerate(enc):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
            tensors[f"{part}.ids"] = ids
            tensors[f"{part}.lengths"] = torch.tensor([len(r) for r in enc], dtype=torch.int32)
            tensors[f"{part}.labels"] = torch.tensor([classes.index(lab) for _, lab in items], dtype=torch.int64)
        save_file(tensors, str(tmp / "tokens.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(
            {"task": name, "classes": classes, "n_train": len(train), "n_test": len(test),
             "config": cfg.__dict__ | {"tasks": list(cfg.tasks)}}, indent=1))
    return folder


def load_task(folder: Path) -> TaskData:
    meta = json.loads((folder / "meta.json").read_text())
    t = load_file(str(folder / "tokens.safetensors"))

    def split(part: str) -> Split:
        return Split(t[f"{part}.ids"].long(), t[f"{part}.lengths"].long(), t[f"{part}.labels"])

    return TaskData(meta["task"], meta["classes"], split("train"), split("test"))


def build_all(cache: Path, cfg: DataConfig) -> dict[str, Path]:
    from .backbone import tokenizer

    tok = tokenizer()
    return {name: build_task(cache, name, cfg, tok) for name in cfg.tasks}
