"""Is a merged model's folder one that the Hugging Face libraries load? Checked on the files, without loading.

A merge writes the weights; loaders need more: `config.json` (whose `model_type` tells transformers the
architecture), the tokenizer files, `generation_config.json`, and for sentence-transformers `modules.json`
and the module folders it names (`1_Pooling/config.json`). The engine copies them from the newest input that has
them (merge.copy_model_files); this check makes sure none went missing, so that a folder the libraries
cannot load never becomes production.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .lora import ADAPTER_FILES


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_folder_problems(folder: Path, base: Checkpoint) -> list[str]:
    """What keeps `folder` from loading as the model `base` is: files the base folder has that it lacks (nested
    module folders included), a config.json without the base's `model_type`, an adapter's own files."""
    problems = []
    base_files = base.side_files()
    missing = [name for name in base_files if not (folder / name).is_file()]
    if missing:
        problems.append(f"{folder}: lacks {len(missing)} file(s) of the base's model folder, first '{missing[0]}'")
    base_config = _json(base_files["config.json"]) if "config.json" in base_files else None
    if isinstance(base_config, dict) and "model_type" in base_config:
        config = _json(folder / "config.json")
        if not isinstance(config, dict) or config.get("model_type") != base_config["model_type"]:
            problems.append(f"{folder}/config.json: not a config of model_type '{base_config['model_type']}' "
                            "(transformers could not load the folder)")
    adapter = [name for name in ADAPTER_FILES if (folder / name).exists()]
    if adapter:
        problems.append(f"{folder}: holds {adapter[0]}, so loaders would take it for an adapter")
    return problems
