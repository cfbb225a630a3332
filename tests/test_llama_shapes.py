"""Llama-shaped decoders (bench/speed/make_models.py's llama-tiny): HF names, bf16, sharded with an index,
tied or untied embeddings. The llama preset's selection, and an output whose dtype and sharding follow
the base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from models import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "speed"))  # bench/ is not a package

import llm_step
from make_models import ensure_models, get_shape

from nufilt_core.checkpoint import INDEX_NAME, Checkpoint
from nufilt_core.merge import DEFAULT_MAX_SHARD_BYTES, MergeRequest, merge_step, output_shard_bytes
from nufilt_core.selection import Selection, detect_preset, is_linear_weight

FAST = {"profile": "paper", "iters": 5}  # the layout does not depend on the adapter's optimisation


def weight_map(folder: Path) -> dict[str, str]:
    return {n: i.file.name for n, i in Checkpoint.open(folder).tensors.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_preset_filters_attention_and_gate_up_only(tied: bool):
    shape = get_shape("llama-tiny", tied)
    names = [n for n, _, _ in shape.plan()]
    shapes = {n: dims for n, dims, _ in shape.plan()}
    assert detect_preset(names) == "llama"
    sel = Selection.resolve(names)
    assert sel.source == "preset:llama"
    filtered = {n for n in names if sel.is_filtered(n, shapes[n])}
    expected = {f"model.layers.{i}.{m}.weight" for i in range(shape.layers)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj")}
    assert filtered == expected
    # embeddings, the output head, norms and down_proj (as CLIP's fc2) are never filtered
    assert ("lm_head.weight" in names) is not tied
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert name not in filtered
    # nor are the embeddings and the head Linear weights for the all-linear rule and OPCM/WUDI
    assert not is_linear_weight("model.embed_tokens.weight", shapes["model.embed_tokens.weight"])
    assert not is_linear_weight("lm_head.weight", shapes["model.embed_tokens.weight"])
    assert is_linear_weight("model.layers.0.mlp.down_proj.weight", shapes["model.layers.0.mlp.down_proj.weight"])


def test_generated_llama_is_hf_layout_bf16_sharded(tmp_path: Path):
    models = ensure_models("llama-tiny", 1, 0, tmp_path)
    base = models["base"]
    index = json.loads((base / INDEX_NAME).read_text())
    files = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    ckpt = Checkpoint.open(base)
    assert {i.dtype for i in ckpt.tensors.values()} == {"BF16"}
    assert ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)  # GQA: 2 of 4 heads
    assert all(i.nbytes <= get_shape("llama-tiny").shard_bytes for i in ckpt.tensors.values())
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["torch_dtype"] == "bfloat16"
    # the same command writes the same bytes; a fine-tune differs by a small task vector
    again = ensure_models("llama-tiny", 1, 0, tmp_path / "again")
    assert all(torch.equal(v, load(again["base"])[k]) for k, v in load(base).items())
    b, t = load(base), load(models["ft-1"])
    q = "model.layers.1.self_attn.q_proj.weight"
    rel = (t[q].float() - b[q].float()).norm() / b[q].float().norm()
    assert 0.01 < rel < 0.04


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_bf16_llama_in_gives_the_same_shards_in_bf16_out(tmp_path: Path, tied: bool):
    models = ensure_models("llama-tiny", 2, 0, tmp_path, tied)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    merge_step(MergeRequest(base=models["base"], checkpoint=models["ft-1"], output=m1, options=FAST))
    result = merge_step(MergeRequest(base=models["base"], checkpoint=models["ft-2"], output=m2, previous=m1))
    base = Checkpoint.open(models["base"])
    for out in (m1, m2):
        assert (out / INDEX_NAME).exists()
        assert weight_map(out) == weight_map(models["base"])  # same file names, same tensors in each
        assert {n: i.dtype for n, i in Checkpoint.open(out).tensors.items()} == {
            n: i.dtype for n, i in base.tensors.items()}
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    assert result.record.summary["filtered_tensors"] == 12 and result.record.summary["selection"] == "preset:llama"
    merged, b = load(m2), load(models["base"])
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in merged.values())
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # keep_base


def test_max_shard_size_given_wins_and_a_single_file_base_stays_one_file(tiny: dict[str, Path], tmp_path: Path):
    models = ensure_models("llama-tiny", 1, 0, tmp_path)
    # asked for: one file, whatever the base
    run_cli("merge", "--base", models["base"], "--checkpoint", models["ft-1"], "--output", tmp_path / "one",
            "--max-shard-size", "1GB", "--iters", "5", "--quiet")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / INDEX_NAME).exists()
    # a single-file base: one file, as before (the 5 GiB default)
    assert output_shard_bytes(None, Checkpoint.open(tiny["base"])) == DEFAULT_MAX_SHARD_BYTES
    assert output_shard_bytes(123, Checkpoint.open(models["base"])) == 123
    largest = max(sum(i.nbytes for i in Checkpoint.open(f).tensors.values())
                  for f in models["base"].glob("*.safetensors"))
    assert output_shard_bytes(None, Checkpoint.open(models["base"])) == largest


@pytest.mark.slow
def test_llm_step_bench_on_llama_tiny(tmp_path: Path, capsys):
    json_file = tmp_path / "figures.json"
    assert llm_step.main(["--shape", "llama-tiny", "--root", str(tmp_path), "--threads", "1",
                          "--option", "iters=5", "--json", str(json_file)]) == 0
    out = capsys.readouterr().out
    assert "MISS" not in out and out.count("PASS") == 7
    assert "time per decoder layer" in out and "peak RSS of the step" in out
    figures = json.loads(json_file.read_text())
    assert [s["label"] for s in figures["layers"]] == ["layer 0", "layer 1"]
    assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 for s in figures["layers"])
    assert figures["engine"]["peak_rss_bytes"] >= max(s["peak_bytes"] for s in figures["layers"])
