"""Accuracy of a body + a task's own head on the task's test split."""

from __future__ import annotations

import torch

from .backbone import mean_pool
from .data import Split


@torch.no_grad()
def features(encoder: torch.nn.Module, split: Split, batch: int = 64) -> torch.Tensor:
    """Mean-pooled features, computed in length order (less padding) and returned in split order."""
    order = torch.argsort(split.lengths, stable=True)
    out = torch.empty((len(split), encoder.config.hidden_size))
    pos = 0
    for ids, mask, _ in split.batches(batch, order):
        out[order[pos:pos + len(ids)]] = mean_pool(encoder, ids, mask)
        pos += len(ids)
    return out


def head_accuracy(feats: torch.Tensor, head: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    logits = feats @ head["weight"].T + head["bias"]
    return float((logits.argmax(1) == labels).float().mean()) * 100.0


def accuracy(encoder: torch.nn.Module, split: Split, head: dict[str, torch.Tensor], batch: int = 64) -> float:
    """Percent correct."""
    return head_accuracy(features(encoder, split, batch), head, split.labels)
