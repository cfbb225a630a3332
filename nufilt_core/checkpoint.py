"""A checkpoint on disk: one safetensors file, or shards with `model.safetensors.index.json`,
or a directory holding either, or a PEFT LoRA adapter folder (lora.py). Only headers are read when
it is opened."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .fsguard import check_tree, entry_stat, open_regular, plain_file_name
from .lora import ADAPTER_CARD, ADAPTER_FILES, LoraAdapter
from .lora import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .private_copy import copy_and_digest
from .readahead import read_ahead
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
# Exports of the whole model in other formats: copied along, they would describe other weights than the merged ones
EXPORT_SUFFIXES = (".onnx", ".onnx_data", ".gguf", ".h5", ".msgpack", ".tflite", ".ot")
MAX_COPIED_FILE_BYTES = 64 * 1024 * 1024
MAX_INDEX_BYTES = 100 * 1024 * 1024  # an index this big is not an index


@dataclass
class Checkpoint:
    path: Path  # what the user gave
    directory: Path  # where the weight files and side files live
    tensors: dict[str, TensorInfo]  # in storage order: shard by shard, by offset

    strict: bool = False  # refuse links and special files everywhere (the daemon's inbox)
    # a PEFT LoRA adapter folder: `tensors` are then the adapter's own (hashed, copied), and the base tensors it
    # changes are made by `model_tensor` once `check_same_layout` has bound it to the base
    adapter: LoraAdapter | None = None

    @classmethod
    def open(cls, path: str | Path, strict: bool = False) -> Checkpoint:
        """Read the headers. Every way a path can be unusable raises CheckpointError naming the file
        (and tensor): a malformed file is the input's fault, never a traceback. `strict`: nothing
        outside the entry is ever read (no symbolic links, no FIFOs/devices/sockets, at any depth)."""
        path = Path(path)
        try:
            if strict:
                check_tree(path)
            return cls._open(path, strict)
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(path, "cannot be read (nested too deeply)") from None
        except (OSError, ValueError, TypeError, KeyError, OverflowError) as e:
            raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e})") from e

    @classmethod
    def _open(cls, path: Path, strict: bool) -> Checkpoint:
        st = entry_stat(path, strict)
        if not stat.S_ISDIR(st.st_mode):
            return cls._from_file(path, strict)
        if os.path.lexists(path / ADAPTER_CONFIG_NAME):
            adapter = LoraAdapter.open(path, strict)
            return cls(path, path, adapter.tensors, strict, adapter)
        index = path / INDEX_NAME
        if index.exists() or index.is_symlink():
            return cls._from_index(path, index, strict)
        files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if len(files) == 1:
            return cls(path, path, read_header(files[0], strict)[0], strict)
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not files and pickles:
            raise CheckpointError(path, f"holds only pickle weights ({', '.join(pickles)}). {CONVERT_HINT}")
        if not files:
            raise CheckpointError(path, "holds no .safetensors file")
        raise CheckpointError(
            path, f"holds {len(files)} .safetensors files but no {INDEX_NAME} to say how they fit together")

    @classmethod
    def _from_file(cls, path: Path, strict: bool) -> Checkpoint:
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(path, f"is a pickle checkpoint. {CONVERT_HINT}")
        if path.name == INDEX_NAME:
            return cls._from_index(path.parent, path, strict)
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "is not a .safetensors file (nor a directory holding one)")
        return cls(path, path.parent, read_header(path, strict)[0], strict)

    @classmethod
    def _from_index(cls, path: Path, index: Path, strict: bool) -> Checkpoint:
        fd = open_regular(index, strict)
        try:
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(MAX_INDEX_BYTES + 1))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("'weight_map' is not an object")
        except RecursionError:
            raise CheckpointError(index, "is not a valid index (nested too deeply)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"is not a valid index (needs a 'weight_map' object): {e}") from e
        for name, shard_name in weight_map.items():
            # a shard is a plain file beside the index: never '../x', '/abs/x' or 'sub/x' (path traversal)
            if not plain_file_name(shard_name):
                raise CheckpointError(index, f"names shard {shard_name!r}, which is not a plain file name in the "
                                      "index's folder", tensor=name)
        shard_names = list(dict.fromkeys(weight_map.values()))  # first-seen order
        tensors: dict[str, TensorInfo] = {}
        for shard_name in sorted(shard_names):
            shard = index.parent / shard_name
            if not os.path.lexists(shard):
                raise CheckpointError(index, f"names shard '{shard_name}', which is missing")
            infos, _ = read_header(shard, strict)
            for name, info in infos.items():
                if weight_map.get(name) != shard_name:
                    raise CheckpointError(shard, f"holds a tensor the index places in "
                                          f"'{weight_map.get(name)}'", tensor=name)
                tensors[name] = info
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(index.parent / shard_name, "lacks a tensor the index lists", tensor=name)
        return cls(path, index.parent, tensors, strict)

    def weight_files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    def largest_shard_bytes(self) -> int | None:
        """Tensor bytes of the biggest weight file when the weights are sharded (several files), else None."""
        per_file: dict[Path, int] = {}
        for info in self.tensors.values():
            per_file[info.file] = per_file.get(info.file, 0) + info.nbytes
        return max(per_file.values()) if len(per_file) > 1 else None

    def side_files(self, reserved: tuple[str, ...] = ()) -> dict[str, Path]:
        """The files of the model folder besides the merged weights, by path relative to it: config.json, the
        tokenizer, generation_config.json, and nested module folders (sentence-transformers' `1_Pooling/`).
        Never the lineage record, a name in `reserved` (files the caller writes itself), an adapter's own files,
        hidden or `_`-prefixed names, exports of the weights in other formats, or files over 64 MiB. A lone weight
        file has none."""
        if self.path.is_file() and self.path.name != INDEX_NAME:
            return {}
        out: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.directory, followlinks=not self.strict):
            here = Path(dirpath)
            top = here == self.directory
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for name in sorted(filenames):
                p = here / name
                if self.strict:  # checked when opened, but never copy a link made since
                    entry_stat(p, strict=True)
                # at the top the merged weights; below it, a module's own safetensors weights are kept
                weights = (*NOT_COPIED_SUFFIXES, *EXPORT_SUFFIXES) if top else (*PICKLE_SUFFIXES, *EXPORT_SUFFIXES)
                ours = top and (name in (INDEX_NAME, LINEAGE_NAME, *ADAPTER_FILES) or name in reserved
                                or (self.adapter is not None and name == ADAPTER_CARD))
                if (p.is_file() and not name.startswith((".", "_")) and not name.endswith(weights) and not ours
                        and p.stat().st_size <= MAX_COPIED_FILE_BYTES):
                    out[str(p.relative_to(self.directory))] = p
        return out

    def content_hash(self, digest_lines: Iterable[str]) -> str:
        """The checkpoint's identity from its tensors' digest lines; an adapter adds its settings' line."""
        extra = [self.adapter.identity_line()] if self.adapter else []
        return combine_digests([*digest_lines, *extra])

    def model_tensor(self, name: str, base: Checkpoint) -> torch.Tensor:
        """Tensor `name` of the model this checkpoint describes, in the base's layout: an adapter's is the base's
        value changed by the adapter (fp32, fp64 for an fp64 base), a full checkpoint's its own."""
        if self.adapter is None:
            return self.read(name)
        if not self.adapter.targets:
            base.check_same_layout(self, "checkpoint")
        w0 = base.read(name)
        return self.adapter.materialise(name, w0.to(torch.float64 if w0.dtype == torch.float64 else torch.float32),
                                        read_tensor)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    def check_same_layout(self, other: Checkpoint, role: str) -> None:
        """`other` has this model's tensor names, shapes and kind of dtype; names the first offender. An adapter
        is checked against this model instead (every key changes one of its tensors, shapes fit) and bound to it."""
        if other.adapter is not None:
            other.adapter.bind(self.tensors, other.path)
            return
        missing = [n for n in self.tensors if n not in other.tensors]
        if missing:
            raise CheckpointError(other.path, f"{role} lacks {len(missing)} tensor(s) the base has, "
                                  f"first '{missing[0]}'", tensor=missing[0])
        extra = [n for n in other.tensors if n not in self.tensors]
        if extra:
            raise CheckpointError(other.path, f"{role} has {len(extra)} tensor(s) the base lacks, "
                                  f"first '{extra[0]}'", tensor=extra[0])
        for name, b in self.tensors.items():
            o = other.tensors[name]
            if o.shape != b.shape:
                raise CheckpointError(o.file, f"{role} has shape {list(o.shape)}, the base {list(b.shape)}",
                                      tensor=name)
            if o.is_float != b.is_float or (not b.is_float and o.dtype != b.dtype):
                raise CheckpointError(o.file, f"{role} has dtype {o.dtype}, the base {b.dtype}", tensor=name)

    def scan(self) -> Iterator[tuple[TensorInfo, torch.Tensor, str]]:
        """Every tensor once, in storage order, with its digest line for the content hash; the next tensor is
        read and hashed on a helper thread meanwhile (readahead.py)."""
        for info, done in read_ahead(list(self.tensors.values()), _read_and_digest, lambda i: i.nbytes):
            raw, digest = done or _read_and_digest(info)
            yield info, tensor_from_raw(info, raw), digest

    def hash_and_non_finite(self, report: Callable[[str], None] | None = None) -> tuple[str, list[TensorInfo]]:
        """One streaming pass: the content hash, and the float tensors holding NaN/Inf."""
        digests, non_finite = [], []
        for info, tensor, digest in self.scan():
            if info.is_float and not all_finite(tensor):
                non_finite.append(info)
            digests.append(digest)
            if report:
                report(info.name)
        return self.content_hash(digests), non_finite

    def copy_to(self, dst: Path) -> str:
        """A real copy of `self.path` at `dst` (must not exist), fsynced, and its content hash from the same
        read of the bytes (private_copy.py): the daemon stages what it hashed, reading it once."""
        return self.content_hash(copy_and_digest(self.path, self.tensors.values(), dst, self.strict))


def _read_and_digest(info: TensorInfo) -> tuple[bytearray, str]:
    raw = read_raw(info)
    return raw, tensor_digest(info.name, info.dtype, info.shape, raw)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in a float tensor. First its sum, in fp32 at least (fp64 as it is): one NaN or Inf makes
    it NaN or Inf, so a finite sum proves the tensor finite at a quarter of isfinite's cost; a sum that is
    not finite (a NaN/Inf, or finite values overflowing) is settled element by element."""
    if not tensor.numel():
        return True
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(tensor if tensor.dtype.itemsize >= 4 else tensor.float()).all())


# The lineage record nufilt writes into a merged model's folder; never copied from an input.
LINEAGE_NAME = "nufilt-lineage.json"
