"""A generated corpus of malformed and hostile checkpoints: real files, links, FIFOs and sockets.

`write_corpus(folder, good, outside)` creates every case as a top-level entry of `folder` (so
the same folder can be an inbox) and returns {entry name: what the error must mention}.
`good` is a valid model folder to derive cases from; `outside` is a folder outside the corpus
holding a secret and a valid checkpoint that links point at.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from pathlib import Path
from typing import Any

GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
SECRET = "TOP-SECRET-a1b2c3"


def raw_file(header: bytes, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def with_header(obj: Any, data: bytes = b"\0" * 16) -> bytes:
    return raw_file(json.dumps(obj).encode(), data)


def tensor(**fields: Any) -> dict[str, Any]:
    return {"t": {**GOOD_ENTRY, **fields}}


# name -> (bytes, fragment the error must contain besides the file name)
HEADER_CASES: dict[str, tuple[bytes, str]] = {
    "empty.safetensors": (b"", "too short"),
    "seven-bytes.safetensors": (b"\x01" * 7, "too short"),
    "len-2-63.safetensors": (raw_file(b"{}", length=2**63), "header length"),
    "len-past-end.safetensors": (raw_file(b"{}", length=1000), "header length"),
    "len-over-limit.safetensors": (raw_file(b"{}", length=100 * 1024 * 1024 + 1), "header length"),
    "non-utf8.safetensors": (raw_file(b'{"\xff\xfe": 1}'), "JSON"),
    "not-json.safetensors": (raw_file(b"{not json"), "JSON"),
    "nested.safetensors": (raw_file(b"[" * 100_000 + b"]" * 100_000), "nested"),
    "nested-obj.safetensors": (raw_file(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), "nested"),
    "array.safetensors": (with_header([1, 2]), "not a JSON object"),
    "string.safetensors": (with_header("x"), "not a JSON object"),
    "meta-list.safetensors": (with_header({"__metadata__": [], **tensor()}), "__metadata__"),
    "meta-string.safetensors": (with_header({"__metadata__": "x", **tensor()}), "__metadata__"),
    "meta-number.safetensors": (with_header({"__metadata__": 3, **tensor()}), "__metadata__"),
    "entry-list.safetensors": (with_header({"t": [1, 2]}), "tensor 't'"),
    "entry-number.safetensors": (with_header({"t": 5}), "tensor 't'"),
    "entry-null.safetensors": (with_header({"t": None}), "tensor 't'"),
    "no-dtype.safetensors": (with_header({"t": {"shape": [2, 2], "data_offsets": [0, 16]}}), "dtype"),
    "no-offsets.safetensors": (with_header({"t": {"dtype": "F32", "shape": [2, 2]}}), "data_offsets"),
    "dtype-list.safetensors": (with_header(tensor(dtype=["F32"])), "dtype"),
    "dtype-number.safetensors": (with_header(tensor(dtype=5)), "dtype"),
    "dtype-null.safetensors": (with_header(tensor(dtype=None)), "dtype"),
    "dtype-object.safetensors": (with_header(tensor(dtype={"F32": 1})), "dtype"),
    "dtype-unknown.safetensors": (with_header(tensor(dtype="F33")), "dtype"),
    "shape-int.safetensors": (with_header(tensor(shape=32)), "shape"),
    "shape-string.safetensors": (with_header(tensor(shape="2,2")), "shape"),
    "shape-negative.safetensors": (with_header(tensor(shape=[-2, -2])), "shape"),
    "shape-float.safetensors": (with_header(tensor(shape=[2.0, 2])), "shape"),
    "shape-bool.safetensors": (with_header(tensor(shape=[True, 2])), "shape"),
    "shape-object.safetensors": (with_header(tensor(shape={"a": 1})), "shape"),
    "shape-nested.safetensors": (with_header(tensor(shape=[[2], 2])), "shape"),
    "shape-huge.safetensors": (with_header(tensor(shape=[2**40, 2**40])), "byte range"),
    "offsets-one.safetensors": (with_header(tensor(data_offsets=[0])), "data_offsets"),
    "offsets-three.safetensors": (with_header(tensor(data_offsets=[0, 8, 16])), "data_offsets"),
    "offsets-string.safetensors": (with_header(tensor(data_offsets="0,16")), "data_offsets"),
    "offsets-str-item.safetensors": (with_header(tensor(data_offsets=[0, "16"])), "data_offsets"),
    "offsets-float.safetensors": (with_header(tensor(data_offsets=[0, 1e30])), "data_offsets"),
    "offsets-bool.safetensors": (with_header(tensor(data_offsets=[False, 16])), "data_offsets"),
    "offsets-null.safetensors": (with_header(tensor(data_offsets=None)), "data_offsets"),
    "offsets-negative.safetensors": (with_header(tensor(data_offsets=[-16, 0])), "byte range"),
    "offsets-past-end.safetensors": (with_header(tensor(data_offsets=[16, 32])), "data ends"),
    "offsets-overlap.safetensors": (with_header({"a": GOOD_ENTRY, "b": GOOD_ENTRY}, b"\0" * 32), "overlaps"),
    "padded.safetensors": (with_header(tensor(), b"\0" * 32), "padded"),
    "name-twice.safetensors": (raw_file(b'{"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                                        b'"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}',
                                        b"\0" * 32), "twice"),
    "gap.safetensors": (with_header({"a": GOOD_ENTRY, "b": {**GOOD_ENTRY, "data_offsets": [32, 48]}}, b"\0" * 48),
                        "gap"),
}


def index_cases(good_file: Path) -> dict[str, tuple[Any, str]]:
    """Folder entries: a valid shard plus an index (a JSON value, or raw bytes) naming shards badly."""
    return {
        "idx-int-name": ({"weight_map": {"t": 7}}, "not a plain file name"),
        "idx-null-name": ({"weight_map": {"t": None}}, "not a plain file name"),
        "idx-dotdot": ({"weight_map": {"t": "../outside.safetensors"}}, "not a plain file name"),
        "idx-absolute": ({"weight_map": {"t": str(good_file)}}, "not a plain file name"),
        "idx-subdir": ({"weight_map": {"t": "sub/model.safetensors"}}, "not a plain file name"),
        "idx-dot": ({"weight_map": {"t": "."}}, "not a plain file name"),
        "idx-empty-name": ({"weight_map": {"t": ""}}, "not a plain file name"),
        "idx-map-list": ({"weight_map": ["model.safetensors"]}, "weight_map"),
        "idx-no-map": ({"metadata": {}}, "weight_map"),
        "idx-array": ([1, 2], "index"),
        "idx-not-json": (b"{nope", "index"),
        "idx-non-utf8": (b'{"weight_map": {"\xff": "a"}}', "index"),
        "idx-nested": (b"[" * 100_000 + b"]" * 100_000, "nested"),
        "idx-missing-shard": ({"weight_map": {"t": "absent.safetensors"}}, "missing"),
    }


def write_corpus(folder: Path, good: Path, outside: Path) -> dict[str, str]:
    """Every case under `folder`; returns {entry name: expected fragment of the error}."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text(SECRET)
    shutil.copy2(good / "model.safetensors", outside / "elsewhere.safetensors")
    expect: dict[str, str] = {}
    for name, (data, fragment) in HEADER_CASES.items():
        (folder / name).write_bytes(data)
        expect[name] = fragment
    for name, (index, fragment) in index_cases(good / "model.safetensors").items():
        d = folder / name
        d.mkdir()
        shutil.copy2(good / "model.safetensors", d / "model.safetensors")
        (d / "sub").mkdir()
        raw = index if isinstance(index, bytes) else json.dumps(index).encode()
        (d / "model.safetensors.index.json").write_bytes(raw)
        expect[name] = fragment
    # nothing outside the entry may be read: links, and things that are not files
    os.mkfifo(folder / "fifo.safetensors")
    expect["fifo.safetensors"] = "FIFO"
    os.symlink("/dev/zero", folder / "devzero.safetensors")
    expect["devzero.safetensors"] = "symbolic link"
    os.symlink("/etc", folder / "etc-link")
    expect["etc-link"] = "symbolic link"
    os.symlink(outside / "elsewhere.safetensors", folder / "outside-link.safetensors")
    expect["outside-link.safetensors"] = "symbolic link"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "sock.safetensors"))
    sock.close()  # the socket file stays
    expect["sock.safetensors"] = "socket"
    for name, inner, fragment in (("config-link", "config.json", "symbolic link"),
                                  ("weights-link", "model.safetensors", "symbolic link"),
                                  ("tokenizer-link", "tokenizer.json", "symbolic link")):
        d = folder / name
        shutil.copytree(good, d)
        (d / inner).unlink(missing_ok=True)
        target = outside / ("elsewhere.safetensors" if inner.endswith(".safetensors") else "secret.txt")
        os.symlink(target, d / inner)
        expect[name] = fragment
    d = folder / "hardlink-inside"  # a second name of a file outside the entry
    shutil.copytree(good, d)
    os.link(outside / "secret.txt", d / "tokenizer.json")
    expect["hardlink-inside"] = "hard link"
    d = folder / "fifo-inside"
    shutil.copytree(good, d)
    os.mkfifo(d / "vocab.txt")
    expect["fifo-inside"] = "FIFO"
    d = folder / "dir-link-inside"
    shutil.copytree(good, d)
    os.symlink(outside, d / "extra")
    expect["dir-link-inside"] = "symbolic link"
    # a shard named by the index that is itself a link out
    d = folder / "idx-shard-link"
    d.mkdir()
    os.symlink(outside / "elsewhere.safetensors", d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    expect["idx-shard-link"] = "symbolic link"
    return expect
