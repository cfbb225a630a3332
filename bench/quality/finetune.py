"""Stage 2: per task, a linear probe on frozen θ0 features (the lower reference, θ0 + head) and
an independent fine-tune θ_t from θ0 (the upper reference), same seeded recipe for every task.

The fine-tune starts its head from the probe (linear probe, then fine-tune) and trains body and
head together; embeddings stay frozen. The body is saved with θ0's tensor names, the heads beside it;
with `lora_rank`, a PEFT LoRA adapter is trained instead of the body and saved as `peft` writes it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbone import base_dir, body_state, mean_pool, new_encoder
from .cache import atomic_dir
from .config import DataConfig, TrainConfig, key
from .data import TaskData
from .evaluate import features, head_accuracy

# every attention and MLP projection of MiniLM's encoder (query, key, value; the three `dense` layers)
LORA_TARGETS = ["query", "key", "value", "dense"]


def finetune_dir(cache: Path, task: str, data: DataConfig, train: TrainConfig) -> Path:
    # a fine-tune does not depend on which other tasks are benchmarked: the task list is not in its key
    return cache / "finetune" / f"{task}-{key(replace(data, tasks=()), train)}"


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression (L2) on fixed features, by full-batch L-BFGS."""
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=cfg.probe_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + cfg.probe_l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}


def train_body(task: TaskData, probe: dict[str, torch.Tensor], cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(cfg.seed)
    encoder = new_encoder().train()
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                     target_modules=LORA_TARGETS, lora_dropout=0.0))
    if cfg.freeze_embeddings:
        for p in encoder.embeddings.parameters():
            p.requires_grad_(False)
    head = torch.nn.Linear(probe["weight"].shape[1], probe["weight"].shape[0])
    with torch.no_grad():
        head.weight.copy_(probe["weight"])
        head.bias.copy_(probe["bias"])
    body_params = [p for p in encoder.parameters() if p.requires_grad]
    groups = [{"params": body_params, "lr": cfg.lr_body}]
    if cfg.freeze_head:
        head.requires_grad_(False)  # the probe stays the head: the paper's fixed zero-shot heads
    else:
        groups.append({"params": list(head.parameters()), "lr": cfg.lr_head})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n = len(task.train)
    per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    total = per_epoch * cfg.epochs
    warmup = max(1, int(total * cfg.warmup_share))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            for ids, mask, labels in task.train.batches(cfg.batch_size, torch.randperm(n, generator=gen)):
                loss = torch.nn.functional.cross_entropy(head(mean_pool(encoder, ids, mask)), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    encoder.eval()
    tail = losses[-per_epoch:] or [float("nan")]
    return encoder, {"head": {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()},
                     "steps": total, "last_epoch_loss": sum(tail) / len(tail)}


def finetune_task(cache: Path, task: TaskData, data: DataConfig, cfg: TrainConfig,
                  theta0: torch.nn.Module | None = None) -> Path:
    folder = finetune_dir(cache, task.name, data, cfg)
    if (folder / "metrics.json").exists():
        return folder
    threads = torch.get_num_threads()
    # one thread, however the benchmark was started: torch splits its reductions by thread count, so a
    # fine-tune rebuilt with another count differs in its last bits, and the merge results kept under the
    # configuration's key would no longer describe the cached fine-tunes
    torch.set_num_threads(1)
    try:
        return _finetune(folder, task, cfg, theta0)
    finally:
        torch.set_num_threads(threads)


def _finetune(folder: Path, task: TaskData, cfg: TrainConfig, theta0: torch.nn.Module | None) -> Path:
    t0 = time.perf_counter()
    theta0 = theta0 or new_encoder()
    x_train, x_test = features(theta0, task.train), features(theta0, task.test)
    probe = fit_probe(x_train, task.train.labels, len(task.classes), cfg)
    probe_acc = head_accuracy(x_test, probe, task.test.labels)
    t_probe = time.perf_counter() - t0
    encoder, info = train_body(task, probe, cfg)
    ft_acc = head_accuracy(features(encoder, task.test), info["head"], task.test.labels)
    with atomic_dir(folder) as tmp:
        if cfg.lora_rank:
            encoder.save_pretrained(tmp / "body")  # adapter_config.json + adapter_model.safetensors
        else:
            (tmp / "body").mkdir()
            save_file(body_state(encoder), str(tmp / "body" / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy2(base_dir() / "config.json", tmp / "body" / "config.json")
        save_file(info["head"], str(tmp / "head.safetensors"))
        save_file(probe, str(tmp / "probe_head.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps({
            "task": task.name, "classes": len(task.classes), "n_train": len(task.train), "n_test": len(task.test),
            "probe_acc": probe_acc, "finetune_acc": ft_acc, "gain": ft_acc - probe_acc,
            "steps": info["steps"], "last_epoch_loss": info["last_epoch_loss"],
            "probe_seconds": round(t_probe, 1), "seconds": round(time.perf_counter() - t0, 1), "threads": 1,
            "config": cfg.__dict__}, indent=1))
    return folder


def load_heads(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fine-tuned head, probe head) of one task."""
    return load_file(str(folder / "head.safetensors")), load_file(str(folder / "probe_head.safetensors"))
