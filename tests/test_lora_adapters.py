"""PEFT LoRA adapters, written by `peft` itself, as checkpoints of the merge engine: every form PEFT saves
is made exactly as PEFT's own merge makes it, a merge of an adapter equals the merge of its dense twin, and
a bad adapter is refused naming the file and the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from peft_models import lora_adapter, peft_merged, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import CheckpointError
from nufilt_core.merge import MergeRequest, merge_step

BERT_CASES = {
    "query-value": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "patterns-bias-embedding-saved": dict(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense", "word_embeddings"], bias="lora_only",
        modules_to_save=["pooler"], rank_pattern={"value": 2}, alpha_pattern={"query": 3}),
    "rslora-lora-bias": dict(r=4, lora_alpha=8, target_modules=["query", "key"], use_rslora=True, lora_bias=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.1\.attention\.self\.(query|value)"),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["query"], layers_to_transform=[1],
                                layers_pattern="layer"),
    "exclude": dict(r=2, lora_alpha=4, target_modules=["dense"], exclude_modules=["pooler.dense"]),
}
OTHER_CASES = {
    "gpt2-fan-in-fan-out": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                            fan_in_fan_out=True)),
    "gpt2-dora-fan-in-fan-out": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 use_dora=True)),
    "llama-every-projection": (tiny_llama, dict(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], modules_to_save=["lm_head"])),
    "llama-embedding": (tiny_llama, dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {make.__name__: make(root / make.__name__) for make in (tiny_bert, tiny_gpt2, tiny_llama)}


def assert_materialises_as_peft_merges(base: Path, adapter: Path, rel: float = 1e-6) -> int:
    """Every float tensor of the base, changed by the adapter as nufilt makes it, against PEFT's merge_and_unload;
    returns how many tensors the adapter changes."""
    b, a = Checkpoint.open(base), Checkpoint.open(adapter)
    b.check_same_layout(a, "checkpoint")
    reference = peft_merged(base, adapter)
    for name, info in b.tensors.items():
        if info.is_float and name in reference:
            got, want = a.model_tensor(name, b), reference[name]
            err = float((got - want).norm()) / max(float(want.norm()), 1e-12)
            assert err <= rel, f"{adapter.name}: {name} differs from PEFT's merge by {err:.3g}"
    assert a.adapter is not None
    return len(a.adapter.targets)


@pytest.mark.parametrize("case", BERT_CASES)
def test_every_bert_form_is_made_as_peft_merges_it(case: str, bases: dict[str, Path], tmp_path: Path):
    adapter = lora_adapter(bases["tiny_bert"], tmp_path / case, **BERT_CASES[case])
    assert assert_materialises_as_peft_merges(bases["tiny_bert"], adapter) > 0


@pytest.mark.parametrize("case", OTHER_CASES)
def test_gpt2_and_llama_forms_are_made_as_peft_merges_them(case: str, bases: dict[str, Path], tmp_path: Path):
    make, config = OTHER_CASES[case]
    adapter = lora_adapter(bases[make.__name__], tmp_path / case, **config)
    assert assert_materialises_as_peft_merges(bases[make.__name__], adapter) > 0


def test_a_bf16_adapter_on_an_fp32_base(bases: dict[str, Path], tmp_path: Path):
    adapter = lora_adapter(bases["tiny_bert"], tmp_path / "bf16", dtype=torch.bfloat16, r=4, lora_alpha=8,
                           target_modules=["query", "value"])
    assert {i.dtype for i in Checkpoint.open(adapter).tensors.values()} == {"BF16"}
    assert_materialises_as_peft_merges(bases["tiny_bert"], adapter)


def dense_twin(base: Path, adapter: Path, folder: Path) -> Path:
    """The full fine-tuned model an adapter stands for, merged by PEFT and saved in the base's layout."""
    stored, merged = load_file(base / "model.safetensors"), peft_merged(base, adapter)
    folder.mkdir()
    save_file({k: merged[k].to(v.dtype).contiguous() if k in merged else v for k, v in stored.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# the default profile merges adapter arrivals two-sided at the mean-norm target: what its explicit settings do
TWO_SIDED = {"profile": "plus", "lora_rank": 0, "two_sided_filter": True, "trust_radius": 0.0}


@pytest.mark.parametrize("method,options,dense_options", [
    ("nufilt", {"profile": "plus-iso", "adapter_arrivals": "as-full", "iters": 20}, None), ("opcm", {}, None),
    ("ties", {}, None), ("nufilt", {}, TWO_SIDED)])
def test_merging_adapters_equals_merging_their_dense_twins(method: str, options: dict, dense_options: dict | None,
                                                           bases: dict[str, Path], tmp_path: Path):
    """The same lineage from adapters and from their dense twins; the default profile treats the adapters as its
    adapter rule (adapter_arrivals) says, i.e. as the twins with that rule's settings."""
    base = bases["tiny_bert"]
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    adapters = [lora_adapter(base, tmp_path / f"a{i}", seed=i, **config) for i in (1, 2, 3)]
    twins = [dense_twin(base, a, tmp_path / f"d{i}") for i, a in enumerate(adapters, 1)]
    outputs = {}
    for kind, inputs, first in (("adapter", adapters, options), ("dense", twins, dense_options or options)):
        previous = None
        for t, ckpt in enumerate(inputs, 1):
            out = tmp_path / f"{kind}-{t}"
            merge_step(MergeRequest(base=base, checkpoint=ckpt, output=out, previous=previous,
                                    method=method if t == 1 else None, options=first if t == 1 else {},
                                    check_first=t != 2))  # the one-pass and the check-first paths
            previous = out
        outputs[kind] = load_file(previous / "model.safetensors")
    for name, want in outputs["dense"].items():
        torch.testing.assert_close(outputs["adapter"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    if dense_options:  # the rule is not the dense one: as-full, the same adapters merge otherwise
        as_full = [tmp_path / "full-1", tmp_path / "full-2"]
        merge_step(MergeRequest(base=base, checkpoint=adapters[0], output=as_full[0],
                                options={"adapter_arrivals": "as-full"}))
        merge_step(MergeRequest(base=base, checkpoint=adapters[1], output=as_full[1], previous=as_full[0]))
        twice = load_file(tmp_path / "adapter-2" / "model.safetensors")
        q = "encoder.layer.0.attention.self.query.weight"
        assert not torch.allclose(load_file(as_full[1] / "model.safetensors")[q], twice[q], atol=1e-4)


def test_the_adapter_is_recorded_in_the_lineage_and_its_files_stay_out_of_the_model(bases: dict[str, Path],
                                                                                     tmp_path: Path):
    base = bases["tiny_bert"]
    adapter = lora_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["query"])
    out = tmp_path / "out"
    run_cli("merge", "--base", base, "--checkpoint", adapter, "--output", out, "--quiet")
    record = json.loads((out / "nufilt-lineage.json").read_text())
    assert record["checkpoints"][0]["declared_base"] == str(base)
    sha, _ = Checkpoint.open(adapter).hash_and_non_finite()
    assert record["checkpoints"][0]["sha256"] == sha
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names  # from the base: the adapter has none
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_the_settings_that_shape_the_update_are_part_of_the_identity(bases: dict[str, Path], tmp_path: Path):
    adapter = lora_adapter(bases["tiny_bert"], tmp_path / "a", r=4, lora_alpha=8, target_modules=["query"])
    sha, _ = Checkpoint.open(adapter).hash_and_non_finite()
    copied = Checkpoint.open(adapter).copy_to(tmp_path / "copy")
    assert copied == sha  # the daemon's intake hashes while it copies: the same identity
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "somewhere/else"  # names, not numbers: the same update
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert Checkpoint.open(adapter).hash_and_non_finite()[0] == sha
    config["lora_alpha"] = 16  # the same factors, twice the update
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert Checkpoint.open(adapter).hash_and_non_finite()[0] != sha


def refusal(base: Path, adapter: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        merge_step(MergeRequest(base=base, checkpoint=adapter, output=adapter.parent / "never"))
    assert not (adapter.parent / "never").exists()
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(".never")]  # no temporary left
    return e.value


def test_bad_adapters_are_refused_naming_the_file_and_the_key(bases: dict[str, Path], tmp_path: Path):
    bert, llama = bases["tiny_bert"], bases["tiny_llama"]
    good = lora_adapter(bert, tmp_path / "good", r=4, lora_alpha=8, target_modules=["query", "value"])

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    # an adapter of another model
    other = lora_adapter(llama, tmp_path / "llama", r=4, lora_alpha=8, target_modules=["q_proj"])
    e = refusal(bert, other)
    assert "model.layers.0.self_attn.q_proj.weight" in str(e) and "the base lacks" in str(e)

    # factors whose shapes do not fit the base (an adapter of a wider model)
    wide = variant("wide")
    tensors = load_file(wide / "adapter_model.safetensors")
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    tensors[key] = torch.zeros(4, 24)
    save_file(tensors, wide / "adapter_model.safetensors")
    e = refusal(bert, wide)
    assert e.tensor is not None and "query" in e.tensor and "encoder.layer.0.attention.self.query.weight" in str(e)

    # a lora_A whose lora_B the file lost
    lost = variant("lost")
    tensors = load_file(lost / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if ".1.attention.self.value.lora_B" not in k}
    save_file(tensors, lost / "adapter_model.safetensors")
    e = refusal(bert, lost)
    assert "'encoder.layer.1.attention.self.value' has lora_B missing" in str(e)

    # factors of a module the config does not target
    untargeted = variant("untargeted")
    tensors = load_file(untargeted / "adapter_model.safetensors")
    for part, shape in (("lora_A", (4, 16)), ("lora_B", (16, 4))):
        tensors[f"base_model.model.encoder.layer.0.attention.self.key.{part}.weight"] = torch.zeros(shape)
    save_file(tensors, untargeted / "adapter_model.safetensors")
    assert "'encoder.layer.0.attention.self.key', which adapter_config.json does not target" in str(
        refusal(bert, untargeted))

    # a rank the config does not declare
    rank = variant("rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    assert "declares r = 8" in str(refusal(bert, rank))

    # NaN in a factor: named, never merged
    nan = variant("nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, nan / "adapter_model.safetensors")
    e = refusal(bert, nan)
    assert e.tensor == key and "NaN" in str(e)

    # a pickled adapter: the conversion command, never unpickled
    pickled = variant("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    e = refusal(bert, pickled)
    assert "adapter_model.bin" in str(e) and "save_file" in str(e)

    # another PEFT method
    ia3 = variant("ia3")
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "peft_type 'IA3'" in str(refusal(bert, ia3))

    # an adapter where a full model belongs
    with pytest.raises(CheckpointError, match="is a PEFT adapter; the base must be a full model"):
        merge_step(MergeRequest(base=good, checkpoint=good, output=tmp_path / "never"))

    # not JSON
    broken = variant("broken")
    (broken / "adapter_config.json").write_text("{")
    assert "adapter_config.json: is not valid JSON" in str(refusal(bert, broken))


def test_the_gate_compares_the_base_an_adapter_names_with_ours(bases: dict[str, Path]):
    from nufilt_daemon.config import GateSettings
    from nufilt_daemon.gate import check_declared_base

    base = Checkpoint.open(bases["tiny_bert"])
    assert check_declared_base(str(bases["tiny_bert"]), base, GateSettings())["matches"]
    assert check_declared_base("/elsewhere/tiny_bert", base, GateSettings())["matches"]  # the folder's name
    assert not check_declared_base("meta-llama/Llama-3.2-1B", base, GateSettings())["matches"]
    named = GateSettings(base_model_name="org/tiny-bert")
    assert check_declared_base("org/tiny-bert", base, named)["matches"]
    assert not check_declared_base(str(bases["tiny_bert"]), base, named)["matches"]
    assert check_declared_base(None, base, named)["matches"]  # an adapter that names no base


@pytest.mark.parametrize("d_out,d_in,rank", [(48, 32, 4), (24, 96, 6), (40, 40, 12)])
def test_nufilt_on_the_factors_equals_nufilt_on_the_dense_task_vector(d_out: int, d_in: int, rank: int):
    """A LoRA arrival's step works on τ_t = L R (V̂t from the r × r problem, the Adam loop's products through
    the factors): the same update as the dense step, to 1e-5 relative, for ranks below and above r_v and for
    both of the dense step's gradient forms (d_in < 2 d_out: through τᵀτ; else direct)."""
    from nufilt_core.methods.nufilt import NufiltSettings, adapter_init, nufilt_matrix

    g = torch.Generator().manual_seed(rank)
    base = torch.randn(d_out, d_in, generator=g)
    tau_prev = 0.05 * torch.randn(d_out, d_in, generator=g)
    left, right = 0.1 * torch.randn(d_out, rank, generator=g), 0.1 * torch.randn(rank, d_in, generator=g)
    tau_new = (base + left @ right) - base  # as the engine has it: θ_t made from the adapter, minus θ0
    s = NufiltSettings(null_rank=16, lora_rank=8, task_rank=8, iters=30)
    a_init = adapter_init(s.lora_rank, d_in, 0, "w", 2)
    dense = nufilt_matrix(tau_prev, tau_new, a_init, s)
    factored = nufilt_matrix(tau_prev, tau_new, a_init, s, (left, right))
    assert factored.v_new.shape == dense.v_new.shape == (d_in, min(rank, 8))
    err = float((factored.update - dense.update).norm() / dense.update.norm())
    assert err <= 1e-5, err
    assert factored.loss_after < factored.loss_before  # the adapter was fitted, not skipped


def test_an_fp16_adapter_on_a_bf16_base_merges_into_a_bf16_model(tmp_path: Path):
    from transformers import BertModel

    base = tmp_path / "base-bf16"
    BertModel.from_pretrained(tiny_bert(tmp_path / "base")).to(torch.bfloat16).save_pretrained(base)
    adapter = lora_adapter(base, tmp_path / "a", dtype=torch.float16, r=4, lora_alpha=8,
                           target_modules=["query", "value"])
    out = tmp_path / "out"
    merge_step(MergeRequest(base=base, checkpoint=adapter, output=out, method="weight_average"))
    merged, reference = load_file(out / "model.safetensors"), peft_merged(base, adapter)
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.bfloat16}
    for name, want in reference.items():  # PEFT rounds its sum to bf16 too; ours is rounded once, from fp32
        torch.testing.assert_close(merged[name].float(), want, rtol=1e-2, atol=1e-2, msg=name)


def test_a_targeted_module_the_wrapped_model_lacked_is_left_as_it_is(bases: dict[str, Path], tmp_path: Path):
    """PEFT wrapped a BertModel without its pooler, whose `dense` the base file holds: `target_modules=["dense"]`
    names it, the adapter has no factors for it, and it stays θ0's (as PEFT would leave it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    model = get_peft_model(BertModel.from_pretrained(bases["tiny_bert"], add_pooling_layer=False),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["dense"]))
    model.save_pretrained(tmp_path / "no-pooler")
    base, adapter = Checkpoint.open(bases["tiny_bert"]), Checkpoint.open(tmp_path / "no-pooler")
    base.check_same_layout(adapter, "checkpoint")
    assert adapter.adapter is not None and "pooler.dense.weight" not in adapter.adapter.targets
    assert torch.equal(adapter.model_tensor("pooler.dense.weight", base), base.read("pooler.dense.weight"))


def test_a_lineage_recorded_before_the_adapter_rule_continues_as_it_was_merged(bases: dict[str, Path],
                                                                               tmp_path: Path):
    """A plus-iso record written before `adapter_arrivals` existed merged adapters as full fine-tunes: it goes on
    doing so (an upgrade never changes a running lineage), while a new plus-iso lineage takes the adapter rule."""
    from nufilt_core.checkpoint import LINEAGE_NAME
    from nufilt_core.methods.nufilt import NufiltSettings

    base = bases["tiny_bert"]
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
    a1, a2 = (lora_adapter(base, tmp_path / f"a{i}", seed=i, **config) for i in (1, 2))
    for lineage, options in (("old", {}), ("as-full", {"adapter_arrivals": "as-full"}), ("new", {})):
        merge_step(MergeRequest(base=base, checkpoint=a1, output=tmp_path / f"{lineage}1", options=options))
    record_path = tmp_path / "old1" / LINEAGE_NAME
    record = json.loads(record_path.read_text())
    assert record["settings"].pop("adapter_arrivals") == "two-sided"
    record_path.write_text(json.dumps({**record, "record_sha256": ""}))
    for lineage in ("old", "as-full", "new"):
        merge_step(MergeRequest(base=base, checkpoint=a2, output=tmp_path / f"{lineage}2",
                                previous=tmp_path / f"{lineage}1"))
    weights = {k: (tmp_path / f"{k}2" / "model.safetensors").read_bytes() for k in ("old", "as-full", "new")}
    assert weights["old"] == weights["as-full"] != weights["new"]
    assert json.loads((tmp_path / "old2" / LINEAGE_NAME).read_text())["settings"]["adapter_arrivals"] == "as-full"
    with pytest.raises(ValueError, match="needs trust_radius"):
        NufiltSettings(profile="paper", adapter_arrivals="two-sided")
