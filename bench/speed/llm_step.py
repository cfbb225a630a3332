"""Time and memory of one NUFILT step on a Llama-shaped decoder (bf16, sharded) through the real engine.

Inputs (written once under bench/cache/, see make_models.py): a Llama-shaped base θ0 with HF names,
two fine-tunes, and the engine's step-1 output θ_1^m. Then step 2 (base, previous = θ_1^m,
checkpoint = θ_2) runs through `nufilt_core.merge.merge_step` in a fresh process (worker.py, as
nufilt_step.py's engine side) with the engine's per-tensor progress recorded. Printed: step time
(wall and CPU), time per decoder layer, peak RSS (of the step and per layer), and whether the
output follows the inputs (bf16 in → bf16 out; sharded with an index in → the same shards out).

Time per layer comes from the engine's progress, not from dividing the step: the merge phase's
time between the last tensor before a layer and that layer's last tensor (the check phase, which
hashes and scans the three inputs, is printed apart). Peak RSS per layer is the highest
per-tensor peak of the layer's tensors (the kernel's high-water mark, reset after each tensor).

    .venv/bin/python bench/speed/llm_step.py --shape llama-tiny
    .venv/bin/python bench/speed/llm_step.py --shape llama-1b --threads 1
    .venv/bin/python bench/speed/llm_step.py --shape llama-7b-wide --threads 1 --tied

Exit status 1 when the output's dtype or sharding does not follow the inputs, the llama preset
did not filter the expected matrices, or a peak-RSS target (TARGET_RSS_BYTES) is missed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from make_models import CACHE, SHAPES, LlamaShape, ensure_models, get_shape
from measure import run_child
from nufilt_step import engine_args, folder_bytes, gb, verdict

from nufilt_core.checkpoint import INDEX_NAME, Checkpoint

# peak RSS: one layer of fp32 work plus the runtime, whatever the number of layers
TARGET_RSS_BYTES = {"llama-1b": 1.5e9, "llama-7b-wide": 2.5e9}
LAYER = re.compile(r"\.layers\.(\d+)\.")
FILTERED_PER_LAYER = 6  # the llama preset: q, k, v, o_proj and gate, up_proj


@dataclass
class Span:
    """One group of tensors of the merge phase: a decoder layer, or the tensors outside the layers."""

    label: str
    seconds: float = 0.0
    peak_bytes: int = 0
    peak_tensor: str = ""


def per_layer(timeline: list[list], layers: int) -> tuple[list[Span], Span, int]:
    """Merge-phase seconds and peak RSS per decoder layer, the same outside the layers, and the check
    phase's peak, from worker.py's timeline rows [phase, name, seconds since start, peak bytes]."""
    spans = [Span(f"layer {n}") for n in range(layers)]
    outside = Span("outside the layers")
    check_peak, last = 0, 0.0
    for phase, name, elapsed, peak in timeline:
        if phase != "merge":
            check_peak, last = max(check_peak, peak), elapsed
            continue
        found = LAYER.search(name)
        span = spans[int(found.group(1))] if found else outside
        span.seconds += elapsed - last  # this tensor: read three inputs, merge, write
        if peak > span.peak_bytes:
            span.peak_bytes, span.peak_tensor = peak, name
        last = elapsed
    return spans, outside, check_peak


def layout_checks(output: Path, inputs: dict[str, Path]) -> list[tuple[str, bool]]:
    """Does the output follow each input: the same dtype per tensor, an index when the input has one, and
    the same tensors in the same files?"""
    out = Checkpoint.open(output)
    out_files = {n: i.file.name for n, i in out.tensors.items()}
    checks = []
    for role, path in inputs.items():
        src = Checkpoint.open(path)
        same_dtypes = all(out.tensors[n].dtype == i.dtype for n, i in src.tensors.items())
        dtypes = sorted({i.dtype for i in src.tensors.values()})
        checks.append((f"dtypes as the {role} ({', '.join(dtypes)})", same_dtypes))
        if (path / INDEX_NAME).exists():
            files = len(src.weight_files())
            same = (output / INDEX_NAME).exists() and out_files == {n: i.file.name for n, i in src.tensors.items()}
            checks.append((f"sharded as the {role} ({files} files + index, same tensors per file)", same))
        else:
            checks.append((f"one file as the {role}", len(out.weight_files()) == 1))
    return checks


def layer_bytes(base: Path) -> tuple[int, int]:
    """Bytes of one decoder layer (layer 0) and of everything outside the layers, in the base."""
    inside = outside = 0
    for name, info in Checkpoint.open(base).tensors.items():
        found = LAYER.search(name)
        if not found:
            outside += info.nbytes
        elif found.group(1) == "0":
            inside += info.nbytes
    return inside, outside


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    llamas = sorted(n for n, s in SHAPES.items() if isinstance(s, LlamaShape))
    ap.add_argument("--shape", choices=llamas, default="llama-tiny")
    ap.add_argument("--tied", action="store_true", help="lm_head tied to the embeddings (no lm_head.weight stored)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    ap.add_argument("--threads", type=int, help="CPU threads of the engine (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="the engine's --device for step 2 (step 1 runs on the CPU)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="NUFILT setting for the chain, e.g. iters=5")
    ap.add_argument("--root", type=Path, default=CACHE, help="where the models are written (default bench/cache)")
    ap.add_argument("--json", type=Path, help="also write the figures (and the per-tensor timeline) here")
    args = ap.parse_args(argv)

    shape = get_shape(args.shape, args.tied)
    assert isinstance(shape, LlamaShape)
    models = ensure_models(args.shape, 2, args.seed, args.root, args.tied)
    work = models["base"].parent
    tag = "" if not args.option else "-" + "-".join(o.replace("=", "") for o in args.option)
    merged1 = work / f"merged-1{tag}"
    if not merged1.exists():
        print(f"step 1 (engine, once): {merged1}", file=sys.stderr)
        run_child(engine_args(models["base"], models["ft-1"], merged1, None, "cpu", args.option), args.threads)
    inputs = {"base": models["base"], "previous": merged1, "checkpoint": models["ft-2"]}
    input_bytes = sum(folder_bytes(p) for p in inputs.values())
    base = Checkpoint.open(models["base"])
    values = sum(i.numel for i in base.tensors.values())
    print(f"shape {shape.key}: {shape.layers} decoder layers, hidden {shape.hidden}, intermediate "
          f"{shape.intermediate}, {shape.heads} heads / {shape.kv_heads} KV heads, vocab {shape.vocab}, "
          f"{'tied' if shape.tied else 'untied'} embeddings; {values / 1e6:.1f} M values")
    print(f"inputs: base + previous + checkpoint = {gb(input_bytes)} on disk, {len(base.weight_files())} "
          f"shard(s) each; threads {args.threads or 'default'}")

    ours = work / f"merged-2{tag}-{args.device.replace(':', '')}"
    eng = run_child([*engine_args(models["base"], models["ft-2"], ours, merged1, args.device, []), "--timeline"],
                    args.threads)
    spans, outside, check_peak = per_layer(eng["timeline"], shape.layers)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in eng["phases"].items())
    print(f"step 2 (engine, fresh process): {eng['seconds']:.1f} s wall, {eng['cpu_seconds']:.1f} CPU-s "
          f"({phases}; check = hash + finite scan of the three inputs); device {eng['device']}")
    secs = [s.seconds for s in spans]
    slowest = max(spans, key=lambda s: s.seconds)
    print(f"time per decoder layer (merge phase, from the engine's per-tensor progress): median "
          f"{statistics.median(secs):.2f} s, min {min(secs):.2f}, max {max(secs):.2f} ({slowest.label}) over "
          f"{shape.layers} layers; outside the layers (embeddings, final norm, lm_head) {outside.seconds:.2f} s; "
          f"whole step / layers {eng['seconds'] / shape.layers:.2f} s")

    peak = eng["peak_rss_bytes"]
    target = TARGET_RSS_BYTES.get(shape.name)
    ok = True
    line = f"peak RSS of the step {gb(peak)}"
    if target:
        ok = peak <= target
        line += f" (<= {gb(target)}: {verdict(ok)})"
    print(line)
    if eng.get("per_tensor_peaks"):
        worst = max(spans, key=lambda s: s.peak_bytes)
        print(f"peak RSS per decoder layer: median {gb(statistics.median(s.peak_bytes for s in spans))}, max "
              f"{gb(worst.peak_bytes)} ({worst.label}, {worst.peak_tensor.rsplit('.', 2)[-2]}); outside the "
              f"layers {gb(outside.peak_bytes)} ({outside.peak_tensor}); check phase {gb(check_peak)}")
    else:
        print("peak RSS per layer: not available (/proc/self/clear_refs cannot be written here)")

    if shape.layers < shape.full_layers:
        # the basis: per-layer work is the same in every layer; the check phase scales with the bytes
        inside, rest = layer_bytes(models["base"])
        scale = (rest + shape.full_layers * inside) / (rest + shape.layers * inside)
        estimate = (eng["phases"]["check"] * scale + outside.seconds + shape.full_layers * statistics.median(secs))
        print(f"estimate for the full depth ({shape.full_layers} layers): {estimate:.0f} s = check "
              f"{eng['phases']['check']:.1f} s x {scale:.1f} (bytes) + outside {outside.seconds:.1f} s + "
              f"{shape.full_layers} x median layer {statistics.median(secs):.2f} s; peak RSS unchanged")

    summary = eng.get("summary", {})
    expected = FILTERED_PER_LAYER * shape.layers
    checks = [(f"NUFILT filtered {summary.get('filtered_tensors')} matrices with {summary.get('selection')} "
               f"(expected {expected} with preset:llama)",
               summary.get("filtered_tensors") == expected and summary.get("selection") == "preset:llama")]
    checks += [(f"output {t}", g) for t, g in layout_checks(ours, inputs)]
    for text, good in checks:
        print(f"check: {text}: {verdict(good)}")
        ok = ok and good
    if args.json:
        args.json.write_text(json.dumps({"shape": shape.key, "input_bytes": input_bytes, "threads": args.threads,
                                         "layers": [s.__dict__ for s in spans], "outside": outside.__dict__,
                                         "checks": checks, "engine": eng}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
