"""The lineage record every merged model carries (`nufilt-lineage.json`).

It is also the continual state: the next step reads method, settings, seed, step and method
state from `--previous`, so a chain of one-shot runs equals one continual run and a crash
between steps loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import LINEAGE_NAME
from .errors import LineageError

FORMAT = "nufilt.lineage/1"


@dataclass
class CheckpointRef:
    sha256: str  # content hash (layout-independent): see safetensors_io.combine_digests
    path: str  # where it was read from, for people; the hash is what counts
    declared_base: str | None = None  # a PEFT adapter's base_model_name_or_path: the base it says it was tuned from


@dataclass
class LineageRecord:
    method: str
    settings: dict[str, Any]
    seed: int
    step: int
    base: CheckpointRef
    checkpoints: list[CheckpointRef]  # in merge order; checkpoints[t-1] is step t
    model_sha256: str  # content hash of the merged weights this record sits beside
    method_state: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tool: str = ""
    created_at: str = ""
    device: str = ""
    duration_seconds: float = 0.0
    peak_rss_bytes: int = 0
    format: str = FORMAT
    # sha256 of the record's other fields (canonical JSON): the next step refuses a record edited since (its
    # weights are hashed in model_sha256, this covers the rest: settings, method state, the merged checkpoints)
    record_sha256: str = ""

    def digest(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "record_sha256"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "record_sha256": self.digest()}, indent=2, sort_keys=False) + "\n"

    def write(self, directory: Path) -> None:
        path = directory / LINEAGE_NAME
        with path.open("w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def read(cls, directory: Path) -> LineageRecord:
        path = directory / LINEAGE_NAME if directory.is_dir() else directory.parent / LINEAGE_NAME
        if not path.exists():
            raise LineageError(
                f"{directory}: no {LINEAGE_NAME} here, so this is not a model nufilt merged; "
                "--previous must be the output of an earlier `nufilt merge` (use --checkpoint for "
                "fine-tuned models)")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise LineageError(f"{path}: unknown lineage format {data.get('format')!r} (expected {FORMAT})")
            data["base"] = CheckpointRef(**data["base"])
            data["checkpoints"] = [CheckpointRef(**c) for c in data["checkpoints"]]
            record = cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            raise LineageError(f"{path}: unreadable lineage record ({e})") from e
        except RecursionError:
            raise LineageError(f"{path}: unreadable lineage record (nested too deeply)") from None
        if record.record_sha256 and record.record_sha256 != record.digest():  # records before the field: unchecked
            raise LineageError(f"{path}: edited after it was written (its record_sha256 no longer matches); restore "
                               "it, or start a new lineage (step 1)")
        return record
