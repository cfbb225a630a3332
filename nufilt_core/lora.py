"""A PEFT LoRA adapter folder as a checkpoint: τ = θ_t − θ0 made one base tensor at a time.

A folder holding `adapter_config.json` is an adapter, as `peft`'s `save_pretrained` writes it:
`adapter_model.safetensors` with keys such as `base_model.model.<module>.lora_A.weight`. The merge
engine never builds the dense fine-tuned model; for each base tensor it asks `materialise`, which
reads only that tensor's factors:

- LoRA on a Linear: ΔW = s·B·A, transposed with `fan_in_fan_out` (GPT-2's Conv1D stores Wᵀ);
- LoRA on an Embedding (`lora_embedding_A/B`): ΔW = s·(B·A)ᵀ;
- LoRA bias (`lora_B.bias`, PEFT's `lora_bias`): Δb = s·b;
- DoRA (`lora_magnitude_vector` m): W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norm of each output row, exactly
  as PEFT merges it; it needs the base tensor, which the engine reads anyway;
- a full tensor (`modules_to_save`, and biases trained with `bias="all"/"lora_only"`, saved under
  `.base_layer.`): its saved value replaces the base's.

The scale s is lora_alpha/r (lora_alpha/√r with `use_rslora`), with `rank_pattern` and `alpha_pattern`
matched to the module as PEFT matches them (its own function). Which modules the config targets
(`target_modules` as a list or a regex, `exclude_modules`, `layers_to_transform`) is asked of PEFT too,
and must agree with the factors the file holds. The identity of an adapter (its content hash) is its
tensors plus the settings that shape ΔW, so the same factors with another alpha are another checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CheckpointError
from .fsguard import open_regular, os_reason
from .safetensors_io import TensorInfo, read_header, tensor_digest

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1024 * 1024
# what an adapter folder holds that a model folder must not: a version holding them would load as an adapter
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLED_WEIGHTS_NAME)
ADAPTER_CARD = "README.md"  # PEFT's model card of the adapter: it describes the adapter, not the merged model
BIN_HINT = (
    "nufilt never unpickles files (a pickle can run arbitrary code). Save the adapter again with "
    "`model.save_pretrained(dir)` (PEFT writes adapter_model.safetensors by default), or convert it once in a "
    "trusted environment: `python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
    "'adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"`.")


class LoraConfig(BaseModel):
    """The fields of PEFT's LoraConfig that decide ΔW; the others (dropout, task type, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: str
    r: int = Field(gt=0)
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    base_model_name_or_path: str | None = None
    # PEFT features whose saved form is not a LoRA factor of a base tensor: refused when set
    target_parameters: list[str] | None = None
    layer_replication: list[Any] | None = None
    trainable_token_indices: Any = None

    def identity(self) -> bytes:
        """The settings that shape ΔW, canonical: part of the adapter's content hash."""
        shaping = self.model_dump(exclude={"base_model_name_or_path", "peft_type"})
        return json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()

    def scale(self, module: str, rank: int) -> float:
        """s of one module: its alpha over its rank (√rank with rsLoRA), patterns matched as PEFT does."""
        from peft.utils.other import get_pattern_key

        alpha = self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), module), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank(self, module: str) -> int:
        from peft.utils.other import get_pattern_key

        return self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), module), self.r)

    def targets(self, module: str) -> bool:
        """Whether PEFT would put LoRA on `module` (a name in the base model, without `base_model.model.`)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        if self.target_modules is None:
            return False
        found = check_target_module_exists(self, module)
        return bool(found) and type(found).__name__ != "_ExcludedModule"


Kind = Literal["linear", "embedding", "bias", "full"]


@dataclass(frozen=True)
class Target:
    """What the adapter does to one base tensor."""

    kind: Kind
    module: str  # the module's name in the base model
    a: TensorInfo | None = None  # lora_A (linear, embedding); None for bias and full
    b: TensorInfo | None = None  # lora_B, its bias, or the full value
    scale: float = 1.0
    magnitude: TensorInfo | None = None  # DoRA's m
    transposed: bool = False  # fan_in_fan_out
    start: TensorInfo | None = None  # a value saved for the tensor itself, which ΔW then changes instead of θ0's

    def factors(self) -> list[TensorInfo]:
        return [i for i in (self.a, self.b, self.magnitude, self.start) if i is not None]


ReadFn = Callable[[TensorInfo], torch.Tensor]


@dataclass
class LoraAdapter:
    """An opened adapter: its settings and, per base tensor name, the Target that changes it."""

    config_file: Path
    config: LoraConfig
    tensors: dict[str, TensorInfo]  # the adapter's own tensors, as stored
    targets: dict[str, Target]  # base tensor name → what changes it (built by `bind`, against the base)
    base_names: dict[str, str]  # adapter key → the base tensor it belongs to
    lora_parts: dict[str, dict[str, TensorInfo]]  # module → LoRA part (A, B, B.bias, ...) → stored tensor
    full: dict[str, str]  # adapter key of a full tensor → the base tensor it replaces

    @classmethod
    def open(cls, folder: Path, strict: bool) -> LoraAdapter:
        config_file = folder / CONFIG_NAME
        config = _read_config(config_file, strict)
        weights = folder / WEIGHTS_NAME
        if not os.path.lexists(weights):
            if os.path.lexists(folder / PICKLED_WEIGHTS_NAME):
                raise CheckpointError(folder / PICKLED_WEIGHTS_NAME, f"is a pickled adapter. {BIN_HINT}")
            raise CheckpointError(folder, f"holds {CONFIG_NAME} but no {WEIGHTS_NAME}")
        tensors, _ = read_header(weights, strict)
        adapter = cls(config_file, config, tensors, {}, {}, {}, {})
        adapter._parse_keys(weights)
        return adapter

    def _parse_keys(self, weights: Path) -> None:
        """Group the stored keys by the base tensor they change; a key of no known form is refused."""
        for key, info in self.tensors.items():
            if not key.startswith(KEY_PREFIX):
                raise CheckpointError(weights, f"key does not start with '{KEY_PREFIX}' (not saved by PEFT's "
                                      "save_pretrained?)", tensor=key)
            if not info.is_float:
                raise CheckpointError(weights, f"holds dtype {info.dtype}; an adapter's tensors are floats", tensor=key)
            name = key[len(KEY_PREFIX):].replace(".base_layer.", ".")
            part = _lora_part(name)
            if part is None:
                if ".lora_" in name or ".token_adapter." in name:
                    raise CheckpointError(weights, "is a PEFT tensor nufilt does not know how to merge", tensor=key)
                self.base_names[key] = self.full[key] = name  # modules_to_save, a trained bias
                continue
            module, part_name = part
            self.lora_parts.setdefault(module, {})[part_name] = info
            self.base_names[key] = f"{module}.bias" if part_name == "B.bias" else f"{module}.weight"

    def bind(self, base: dict[str, TensorInfo], path: Path) -> None:
        """Check the adapter against the base's tensors and build `targets`. Errors name the adapter key and
        the base tensor: a target the base lacks, factors whose shapes do not fit it, a rank the config
        does not declare, factors of a module the config does not target, a lora_A without its lora_B."""
        c = self.config
        targets: dict[str, Target] = {}
        for key, name in self.base_names.items():
            if name not in base:
                raise CheckpointError(path, f"adapter changes base tensor '{name}', which the base lacks "
                                      "(an adapter of another model?)", tensor=key)
        for module, parts in self.lora_parts.items():
            embedding = "embedding_A" in parts or "embedding_B" in parts
            a_key, b_key = ("embedding_A", "embedding_B") if embedding else ("A", "B")
            a, b = parts.get(a_key), parts.get(b_key)
            if a is None or b is None:
                present = next(iter(parts.values()))
                raise CheckpointError(path, f"module '{module}' has lora_{'B' if b is None else 'A'} missing",
                                      tensor=present.name)
            for factor in (a, b):
                if len(factor.shape) != 2:
                    raise CheckpointError(path, f"is {len(factor.shape)}-D; nufilt merges LoRA on Linear and "
                                          "Embedding layers (not convolutions)", tensor=factor.name)
            weight = base[f"{module}.weight"]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise CheckpointError(path, f"lora_B has shape {list(b.shape)}, lora_A {list(a.shape)}: ranks differ",
                                      tensor=b.name)
            if rank != c.rank(module):
                raise CheckpointError(path, f"has rank {rank}; {CONFIG_NAME} declares r = {c.rank(module)} for "
                                      f"'{module}' (r, rank_pattern)", tensor=a.name)
            if embedding:
                product = (a.shape[1], b.shape[0])  # (B·A)ᵀ
            else:
                product = (b.shape[0], a.shape[1])
                if c.fan_in_fan_out:
                    product = product[::-1]
            if len(weight.shape) != 2 or tuple(weight.shape) != product:
                raise CheckpointError(path, f"makes ΔW of shape {list(product)}, base tensor '{weight.name}' has "
                                      f"{list(weight.shape)}", tensor=b.name)
            magnitude = parts.get("magnitude")
            if magnitude is not None:
                if embedding:
                    raise CheckpointError(path, "DoRA on an embedding is not supported", tensor=magnitude.name)
                out_dim = weight.shape[1] if c.fan_in_fan_out else weight.shape[0]
                if tuple(magnitude.shape) != (out_dim,):
                    raise CheckpointError(path, f"DoRA magnitude has shape {list(magnitude.shape)}, base tensor "
                                          f"'{weight.name}' has {out_dim} output rows", tensor=magnitude.name)
            s = c.scale(module, rank)
            targets[weight.name] = Target("embedding" if embedding else "linear", module, a, b, s, magnitude,
                                          c.fan_in_fan_out and not embedding)
            bias = parts.get("B.bias")
            if bias is not None:
                base_bias = base[f"{module}.bias"]
                if tuple(bias.shape) != tuple(base_bias.shape):
                    raise CheckpointError(path, f"has shape {list(bias.shape)}, base tensor '{base_bias.name}' "
                                          f"{list(base_bias.shape)}", tensor=bias.name)
                targets[base_bias.name] = Target("bias", module, b=bias, scale=s)
        for key, name in self.full.items():
            info = self.tensors[key]
            if tuple(info.shape) != tuple(base[name].shape):
                raise CheckpointError(path, f"has shape {list(info.shape)}, base tensor '{name}' "
                                      f"{list(base[name].shape)}", tensor=key)
            if name in targets:  # PEFT saves a targeted embedding's own weight beside its factors
                targets[name] = replace(targets[name], start=info)
            else:
                targets[name] = Target("full", name.rsplit(".", 1)[0], b=info)
        self._check_declared(targets, path)
        self.targets = targets

    def _check_declared(self, targets: dict[str, Target], path: Path) -> None:
        """Every module with factors is one the config targets, as PEFT decides it. (A targeted module without
        factors is left as it is, as PEFT leaves it: the model PEFT wrapped may lack modules the base file holds,
        such as a pooler.)"""
        for name, t in targets.items():
            if t.kind in ("linear", "embedding") and not self.config.targets(t.module):
                raise CheckpointError(path, f"holds LoRA factors for module '{t.module}', which {CONFIG_NAME} does "
                                      "not target (target_modules, exclude_modules, layers_to_transform)",
                                      tensor=t.a.name if t.a else name)

    def dtype_of(self, name: str) -> torch.dtype | None:
        """The coarsest dtype among the stored tensors that change base tensor `name`; None if untouched."""
        t = self.targets.get(name)
        if t is None:
            return None
        return max((i.torch_dtype for i in t.factors()), key=lambda d: torch.finfo(d).eps)

    def factor_bytes(self, name: str) -> int:
        t = self.targets.get(name)
        return sum(i.nbytes for i in t.factors()) if t else 0

    def materialise(self, name: str, base: torch.Tensor, read: ReadFn) -> torch.Tensor:
        """θ_t of base tensor `name` given θ0's value `base` (in the compute dtype; the result has it too),
        reading only this tensor's factors with `read`."""
        t = self.targets.get(name)
        if t is None:
            return base
        dtype = base.dtype

        def get(info: TensorInfo) -> torch.Tensor:
            return read(info).to(device=base.device, dtype=dtype)

        if t.kind == "full":
            assert t.b is not None
            return get(t.b)
        if t.start is not None:
            base = get(t.start)
        if t.kind == "bias":
            assert t.b is not None
            return base + t.scale * get(t.b)
        assert t.a is not None and t.b is not None
        product = get(t.b) @ get(t.a)
        delta = t.scale * (product.T if t.kind == "embedding" or t.transposed else product)
        if t.magnitude is None:
            return base + delta
        merged = base + delta
        rows = 0 if t.transposed else 1  # the norm of each output row: over the input dimension
        factor = get(t.magnitude) / torch.linalg.vector_norm(merged, dim=rows)
        return merged * (factor.view(1, -1) if t.transposed else factor.view(-1, 1))

    def factors(self, name: str, shape: tuple[int, ...], read: ReadFn, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW of the base matrix `name` [d_out, d_in] as (left, right) with ΔW = left @ right: rank 0 where the
        adapter leaves it alone, LoRA's factors for a plain LoRA update; None for DoRA or a saved value of its own."""
        t = self.targets.get(name)
        if t is None:
            return torch.zeros((shape[0], 0), dtype=dtype, device=device), torch.zeros((0, shape[1]), dtype=dtype,
                                                                                      device=device)
        if t.kind not in ("linear", "embedding") or t.magnitude is not None or t.start is not None:
            return None
        assert t.a is not None and t.b is not None
        a, b = (read(i).to(device=device, dtype=dtype) for i in (t.a, t.b))
        if t.kind == "embedding" or t.transposed:  # ΔW = s·(B A)ᵀ = Aᵀ (s·Bᵀ)
            return a.T, t.scale * b.T
        return t.scale * b, a

    def identity_line(self) -> str:
        """The settings' line of the content hash (beside the tensors' lines)."""
        raw = self.config.identity()
        return tensor_digest(CONFIG_NAME, "JSON", [len(raw)], raw)


def _lora_part(name: str) -> tuple[str, str] | None:
    """(module, part) of a LoRA key without the prefix: part A, B, B.bias, embedding_A, embedding_B or magnitude."""
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "B.bias"),
                         (".lora_embedding_A", "embedding_A"), (".lora_embedding_B", "embedding_B"),
                         (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude")):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return None


def _read_config(path: Path, strict: bool) -> LoraConfig:
    fd = open_regular(path, strict)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {os_reason(e)}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(path, f"is over {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "is not a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(path, f"is a PEFT adapter of peft_type {peft_type!r}; nufilt merges LoRA adapters "
                              "(peft_type 'LORA', DoRA included). Merge it into its base with PEFT "
                              "(`merge_and_unload()`) and submit the full model instead")
    try:
        config = LoraConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(path, f"'{where}': {first['msg']}") from None
    for field, what in (("target_parameters", "LoRA on parameters (target_parameters)"),
                        ("layer_replication", "layer replication"),
                        ("trainable_token_indices", "trainable tokens (trainable_token_indices)")):
        if getattr(config, field):
            raise CheckpointError(path, f"uses {what}, which nufilt does not merge")
    return config
