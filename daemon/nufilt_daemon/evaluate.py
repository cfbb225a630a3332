"""Ready-made validation commands for Hugging Face model folders: `nufilt eval accuracy` (a sequence
classifier on a labelled JSONL or CSV file) and `nufilt eval perplexity` (a causal LM on a text file).

Each takes the model folder last, as the gate gives a candidate to `gate.command`, and prints one JSON
object of metrics, so either works as the gate's command as it is, with absolute thresholds or thresholds
relative to production (`{accuracy = {min_delta = -0.01}}`, `{perplexity = {max_delta = 0.5}}`).
They need `transformers` (the `eval` extra); the model folder must hold what `from_pretrained` loads
(every merged version does) and a tokenizer, or `--tokenizer` names one.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nufilt_core.errors import NufiltError

EXAMPLES = """\
examples:
  nufilt eval accuracy --data dev.jsonl production/          # {"accuracy": 0.91, "examples": 500}
  nufilt eval perplexity --data held-out.txt production/     # {"perplexity": 12.3, "loss": 2.51, "tokens": 40960}
  # as the gate's command (nufilt.toml): the candidate folder is appended
  [gate]
  command = ["nufilt", "eval", "accuracy", "--data", "/data/dev.jsonl"]
  thresholds = { accuracy = { min = 0.8, min_delta = -0.01 } }
"""


class EvalError(NufiltError):
    """The data or the model cannot be evaluated (the message names the file)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise EvalError("nufilt eval needs transformers: pip install 'nufilt[eval]'") from None
    transformers.logging.set_verbosity_error()  # the command's output is its JSON line
    return transformers


def read_labelled(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label) rows of a JSONL file (one object per line) or a CSV file with a header row."""
    rows: list[tuple[str, str]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            records: Iterator[dict[str, Any]] = (
                csv.DictReader(f) if path.suffix.lower() == ".csv"
                else (json.loads(line) for line in f if line.strip()))
            for number, record in enumerate(records, 1):
                if not isinstance(record, dict) or text_field not in record or label_field not in record:
                    raise EvalError(f"{path}: record {number} lacks '{text_field}' or '{label_field}'")
                rows.append((str(record[text_field]), str(record[label_field])))
    except OSError as e:
        raise EvalError(f"{path}: {e.strerror}") from None
    except (ValueError, csv.Error) as e:
        raise EvalError(f"{path}: not JSON lines or CSV ({e})") from None
    if not rows:
        raise EvalError(f"{path}: no examples")
    return rows


def label_ids(config: Any, labels: list[str], path: Path) -> list[int]:
    """Each row's label as the model's class index: a name from the model's label2id, or the index itself."""
    names = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    out = []
    for label in labels:
        if label in names:
            out.append(names[label])
        elif label.lstrip("-").isdigit() and 0 <= int(label) < config.num_labels:
            out.append(int(label))
        else:
            raise EvalError(f"{path}: label {label!r} is neither one of the model's labels "
                            f"({', '.join(names) or 'none named'}) nor an index below {config.num_labels}")
    return out


def accuracy(model_dir: Path, data: Path, tokenizer: Path | None = None, text_field: str = "text",
             label_field: str = "label", batch_size: int = 32, max_length: int = 256) -> dict[str, float]:
    import torch

    tf = _transformers()
    rows = read_labelled(data, text_field, label_field)
    try:
        tok = tf.AutoTokenizer.from_pretrained(tokenizer or model_dir)
        model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise EvalError(f"{model_dir}: cannot load a sequence classifier and its tokenizer ({e})") from None
    truth = label_ids(model.config, [label for _, label in rows], data)
    right = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            texts = [text for text, _ in rows[start:start + batch_size]]
            batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1).tolist()
            right += sum(p == t for p, t in zip(predicted, truth[start:start + batch_size], strict=True))
    return {"accuracy": right / len(rows), "examples": len(rows)}


def perplexity(model_dir: Path, data: Path, tokenizer: Path | None = None, max_length: int = 512) -> dict[str, float]:
    """exp of the mean next-token loss over the text, cut into windows of `max_length` tokens."""
    import torch

    tf = _transformers()
    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{data}: {getattr(e, 'strerror', None) or e}") from None
    try:
        tok = tf.AutoTokenizer.from_pretrained(tokenizer or model_dir)
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    except (OSError, ValueError) as e:
        raise EvalError(f"{model_dir}: cannot load a causal LM and its tokenizer ({e})") from None
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < 2:
        raise EvalError(f"{data}: fewer than 2 tokens")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, max_length):
            window = ids[start:start + max_length + 1].unsqueeze(0)  # each window predicts its own tokens 1..n
            if window.shape[1] < 2:
                break
            loss = model(window, labels=window).loss  # mean over the window's predicted tokens
            n = window.shape[1] - 1
            total += float(loss) * n
            count += n
    mean = total / count
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "loss": mean, "tokens": count}
