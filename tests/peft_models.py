"""Tiny Hugging Face models and PEFT LoRA adapters written by `transformers` and `peft` themselves, so the
layouts the tests read are the libraries', not ours; and PEFT's own merge of an adapter into its base
(`merge_and_unload`), the reference a materialised adapter must equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(folder)
    return folder


def _load(base: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kind = AutoConfig.from_pretrained(base).model_type
    loader = AutoModel if kind == "bert" else AutoModelForCausalLM
    return loader.from_pretrained(base)


def lora_adapter(base: Path, folder: Path, seed: int = 1, dtype: torch.dtype | None = None, **config: Any) -> Path:
    """A LoRA adapter of `base` as `peft` saves it, with every factor random (a trained adapter's B is not
    zero), so each part of ΔW shows; `dtype` casts the adapter's tensors (a bf16 adapter)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(base), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the adapter's own parameters (factors, magnitudes, modules to save, biases)
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
        if dtype is not None:
            model = model.to(dtype)
    model.save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter merged in by PEFT (fp32), by the base's tensor names."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()
    return {k: v.float() for k, v in model.state_dict().items()}
