"""A checkpoint on disk: one safetensors file, or shards with `model.safetensors.index.json`,
or a directory holding either. Only headers are read when it is opened."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_io import (
    TensorInfo,
    combine_digests,
    read_header,
    read_raw,
    read_tensor,
    tensor_digest,
    tensor_from_raw,
)

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "nufilt never unpickles files (a pickle can run arbitrary code). Convert it once in a trusted "
    "environment, e.g. `python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\"`, "
    "or `model.save_pretrained(dir, safe_serialization=True)` with transformers.")
# Files that belong to the weights or to nufilt itself; everything else small is copied along.
NOT_COPIED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MAX_COPIED_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class Checkpoint:
    path: Path  # what the user gave
    directory: Path  # where the weight files and side files live
    tensors: dict[str, TensorInfo]  # in storage order: shard by shard, by offset

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(path, "does not exist")
        if path.is_file():
            return cls._from_file(path)
        index = path / INDEX_NAME
        if index.exists():
            return cls._from_index(path, index)
        files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if len(files) == 1:
            return cls(path, path, read_header(files[0])[0])
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not files and pickles:
            raise CheckpointError(path, f"holds only pickle weights ({', '.join(pickles)}). {CONVERT_HINT}")
        if not files:
            raise CheckpointError(path, "holds no .safetensors file")
        raise CheckpointError(
            path, f"holds {len(files)} .safetensors files but no {INDEX_NAME} to say how they fit together")

    @classmethod
    def _from_file(cls, path: Path) -> Checkpoint:
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(path, f"is a pickle checkpoint. {CONVERT_HINT}")
        if path.name == INDEX_NAME:
            return cls._from_index(path.parent, path)
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "is not a .safetensors file (nor a directory holding one)")
        return cls(path, path.parent, read_header(path)[0])

    @classmethod
    def _from_index(cls, path: Path, index: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"is not a valid index (needs a 'weight_map' object): {e}") from e
        shard_names = list(dict.fromkeys(weight_map.values()))  # first-seen order
        tensors: dict[str, TensorInfo] = {}
        for shard_name in sorted(shard_names):
            shard = index.parent / shard_name
            if not shard.is_file():
                raise CheckpointError(index, f"names shard '{shard_name}', which is missing")
            infos, _ = read_header(shard)
            for name, info in infos.items():
                if weight_map.get(name) != shard_name:
                    raise CheckpointError(shard, f"holds a tensor the index places in "
                                          f"'{weight_map.get(name)}'", tensor=name)
                tensors[name] = info
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(index.parent / shard_name, "lacks a tensor the index lists", tensor=name)
        return cls(path, index.parent, tensors)

    def weight_files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    def side_files(self) -> list[Path]:
        """Small files beside the weights (config.json, tokenizer, ...) worth carrying along."""
        if self.path.is_file() and self.path.name != INDEX_NAME:
            return []
        out = []
        for p in sorted(self.directory.iterdir()):
            if (p.is_file() and not p.name.startswith((".", "_")) and p.name != INDEX_NAME
                    and not p.name.endswith(NOT_COPIED_SUFFIXES) and p.name not in RESERVED_NAMES
                    and p.stat().st_size <= MAX_COPIED_FILE_BYTES):
                out.append(p)
        return out

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    def scan(self) -> Iterator[tuple[TensorInfo, torch.Tensor, str]]:
        """Every tensor once, in storage order, with its digest line for the content hash."""
        for info in self.tensors.values():
            raw = read_raw(info)
            yield info, tensor_from_raw(info, raw), tensor_digest(info.name, info.dtype, info.shape, raw)

    def hash_and_non_finite(self, report: Callable[[str], None] | None = None) -> tuple[str, list[TensorInfo]]:
        """One streaming pass: the content hash, and the float tensors holding NaN/Inf."""
        digests, non_finite = [], []
        for info, tensor, digest in self.scan():
            if info.is_float and tensor.numel() and not bool(torch.isfinite(tensor.float()).all()):
                non_finite.append(info)
            digests.append(digest)
            if report:
                report(info.name)
        return combine_digests(digests), non_finite


# Names nufilt writes into a merged model's folder; never copied from an input.
LINEAGE_NAME = "nufilt-lineage.json"
RESERVED_NAMES = {LINEAGE_NAME, "validation.json", "_COMPLETE"}
