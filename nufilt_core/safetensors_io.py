"""Low-level safetensors access: header validation, one-tensor reads, streaming writes.

Why not `safetensors.safe_open` for reading: it memory-maps whole files, and every page it
touches stays in the process's resident set until the file is closed, so reading three 3 GB
models tensor by tensor would show ~9 GB RSS. Reading each tensor with `preadv` into its own
buffer keeps the resident set at the tensors we actually hold. Files we write are plain
safetensors (checked against the `safetensors` library in the tests).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .fsguard import open_regular, os_reason

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, strict: bool = False) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header against the file's size.

    Returns the tensors (in file order) and the `__metadata__` dict. Raises CheckpointError
    naming the file and tensor when the header is unreadable, of the wrong types, or the file is
    truncated; nothing else escapes (a malformed file must never look like a bug). `strict`
    refuses a symbolic link (the daemon's inbox).
    """
    fd = open_regular(path, strict)
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(path, f"file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    path, f"header length {header_len} does not fit in a {size}-byte file "
                    "(truncated or not a safetensors file)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {os_reason(e)}") from e
    finally:
        os.close(fd)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(path, "header names this tensor twice (the safetensors library refuses such a file)",
                              tensor=e.key) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"header is not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(path, "header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CheckpointError(path, f"__metadata__ is a JSON {_json_type(metadata)}, not an object")
    data_start = 8 + header_len
    data_len = size - data_start
    infos = [_tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()]
    infos.sort(key=lambda i: i.start)
    covered = 0
    for info in infos:
        if info.start - data_start < covered:
            raise CheckpointError(path, "byte range overlaps the previous tensor", tensor=info.name)
        if info.start - data_start > covered:  # bytes no tensor owns: refused by the safetensors library too
            raise CheckpointError(path, f"byte range leaves a gap of {info.start - data_start - covered} bytes "
                                  "before this tensor", tensor=info.name)
        covered = info.start - data_start + info.nbytes
    if covered != data_len:
        raise CheckpointError(
            path, f"header describes {covered} data bytes but the file holds {data_len} "
            "(truncated or padded file)")
    return {i.name: i for i in infos}, {str(k): str(v) for k, v in metadata.items()}


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook that refuses a key given twice (json.loads would keep the last silently)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_type(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    """One header entry, every field's JSON type checked before it is used."""
    if not isinstance(entry, dict):
        raise CheckpointError(path, f"header entry is a JSON {_json_type(entry)}, not an object", tensor=name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(path, f"malformed header entry (no {', '.join(missing)})", tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(path, f"unsupported dtype {dtype!r}", tensor=name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(path, f"invalid shape {shape!r} (a list of non-negative integers)", tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(path, f"invalid data_offsets {offsets!r} (two integers)", tensor=name)
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(
            path, f"byte range {begin}..{end} does not hold {dtype}{list(shape)} "
            f"({expected} bytes)", tensor=name)
    if end > data_len:
        raise CheckpointError(
            path, f"data ends at byte {end} but the file holds only {data_len} data bytes "
            "(truncated file?)", tensor=name)
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, expected)


def read_raw(info: TensorInfo, fd: int | None = None) -> bytearray:
    """The tensor's bytes, read with one pread into a fresh buffer (no mmap). `fd`: a descriptor already open
    on `info.file` (left open), so a copy reads the very file it checked, not whatever the name holds now."""
    buf = bytearray(info.nbytes)
    if info.nbytes:
        own = fd is None
        if fd is None:
            fd = open_regular(info.file, strict=False)
        try:
            got = 0
            view = memoryview(buf)
            while got < info.nbytes:
                try:
                    n = os.preadv(fd, [view[got:]], info.start + got)
                except OSError as e:
                    raise CheckpointError(info.file, f"cannot read: {os_reason(e)}", tensor=info.name) from e
                if n == 0:
                    raise CheckpointError(info.file, "file ended while reading", tensor=info.name)
                got += n
        finally:
            if own:
                os.close(fd)
    return buf


def tensor_from_raw(info: TensorInfo, buf: bytearray) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    return tensor_from_raw(info, read_raw(info))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, any dtype (bf16/fp8 included)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: bytes | bytearray | memoryview) -> str:
    """One line of a model's content hash: name, dtype, shape and sha256 of the bytes."""
    return f"{name}\t{dtype}\t{list(shape)}\t{hashlib.sha256(data).hexdigest()}\n"


def combine_digests(lines: Iterable[str]) -> str:
    """A model's content hash: independent of file layout (sharding) and tensor order."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode())
    return h.hexdigest()


@dataclass
class _PlannedShard:
    path: Path
    names: list[str]
    header: bytes


class StreamingWriter:
    """Writes tensors, in a fixed order known up front, into shards of bounded size.

    Headers are written first (all names, shapes and dtypes are known before the merge), so
    each tensor goes to disk as soon as it is computed and nothing accumulates in memory.
    """

    def __init__(self, directory: Path, plan: list[tuple[str, str, tuple[int, ...]]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.directory = directory
        self._expected = plan
        self._next = 0
        self.digests: dict[str, str] = {}  # name → content-hash line of what was written
        self._shards = self._plan_shards(plan, max_shard_bytes, metadata or {"format": "pt"})
        self._shard_of = {n: i for i, s in enumerate(self._shards) for n in s.names}
        self._open: tuple[int, object] | None = None
        self.total_bytes = sum(math.prod(s) * DTYPES[d].itemsize for _, d, s in plan)

    def _plan_shards(self, plan, max_shard_bytes, metadata) -> list[_PlannedShard]:
        groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            nbytes = math.prod(item[2]) * DTYPES[item[1]].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        n = len(groups)
        shards = []
        for k, group in enumerate(groups, 1):
            fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": metadata}
            offset = 0
            for name, dtype, shape in group:
                nbytes = math.prod(shape) * DTYPES[dtype].itemsize
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as the safetensors library does
            shards.append(_PlannedShard(self.directory / fname, [g[0] for g in group], raw))
        return shards

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if name != exp_name:
            raise RuntimeError(f"writer expected tensor {exp_name!r} next, got {name!r}")
        if DTYPE_NAMES[tensor.dtype] != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise RuntimeError(f"tensor {name!r}: expected {exp_dtype}{list(exp_shape)}, "
                               f"got {DTYPE_NAMES[tensor.dtype]}{list(tensor.shape)}")
        shard_index = self._shard_of[name]
        if self._open is None or self._open[0] != shard_index:
            self._close_current()
            shard = self._shards[shard_index]
            f = shard.path.open("wb")
            f.write(struct.pack("<Q", len(shard.header)))
            f.write(shard.header)
            self._open = (shard_index, f)
        data = tensor_bytes(tensor.cpu())
        self._open[1].write(data)  # type: ignore[attr-defined]
        self.digests[name] = tensor_digest(name, exp_dtype, exp_shape, data)
        self._next += 1

    def _close_current(self) -> None:
        if self._open is not None:
            f = self._open[1]
            f.flush()  # type: ignore[attr-defined]
            os.fsync(f.fileno())  # type: ignore[attr-defined]
            f.close()  # type: ignore[attr-defined]
            self._open = None

    def close(self) -> str:
        """Finish the files (and the index when sharded); returns the content hash."""
        if self._next != len(self._expected):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._expected)} tensors")
        self._close_current()
        for shard in self._shards:  # shards with no tensors cannot exist, but a model may be empty
            if not shard.path.exists():
                with shard.path.open("wb") as f:
                    f.write(struct.pack("<Q", len(shard.header)) + shard.header)
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {n: s.path.name for s in self._shards for n in s.names},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return combine_digests(self.digests.values())
