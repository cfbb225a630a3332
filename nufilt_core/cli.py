"""`nufilt merge` and `nufilt inspect`: the one-shot interface to the merge engine."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, interrupts
from .checkpoint import LINEAGE_NAME, Checkpoint
from .demo import add_demo_parser
from .devices import set_threads
from .errors import NufiltError
from .lineage import LineageRecord
from .matrix_pool import EXECUTORS
from .merge import MergeRequest, Progress, merge_step
from .methods import METHODS
from .methods.profiles import DEFAULT_PROFILE, PROFILES
from .selection import PRESETS

MERGE_EPILOG = f"""\
methods:
{chr(10).join(f"  {name:<16} {cls.summary_line}" for name, cls in METHODS.items())}

examples:
  # step 1: merge the first fine-tuned model (no --previous), NUFILT's default profile plus-iso
  nufilt merge --base base/ --checkpoint task1/ --output merged-1/
  # the paper's NUFILT instead (what the parity tests check)
  nufilt merge --base base/ --checkpoint task1/ --output paper-1/ --profile paper
  # step 2: continue from the previous merged model; method, settings and seed are read
  # from merged-1/{LINEAGE_NAME}, so only what changes needs saying
  nufilt merge --base base/ --previous merged-1/ --checkpoint task2/ --output merged-2/
  # a baseline, with one of its settings
  nufilt merge --base base/ --checkpoint task1/ --output ta-1/ --method task_arithmetic --scale 0.3

Inputs are safetensors: a file, a folder with model.safetensors, or shards with
model.safetensors.index.json. Everything is checked (names, shapes, dtypes, finite values,
lineage) before any merging starts. The output folder appears only when complete.
"""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1073741824)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    return int(float(m.group(1)) * factor)


def parse_assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="one continual merge step: base + previous merged model + new checkpoint",
        description="Merge one fine-tuned checkpoint into the previous merged model (continual merging, "
        "no data needed).", epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--base", required=True, type=Path,
                    help="pre-trained model θ0 the checkpoints were tuned from (its folder: config, tokenizer and "
                         "module folders are carried into every output)")
    io.add_argument("--previous", type=Path, help="output of the previous step (omit for step 1)")
    io.add_argument("--checkpoint", required=True, type=Path,
                    help="the new fine-tuned model θ_t: a model folder, a .safetensors file, or a PEFT LoRA adapter "
                         "folder (adapter_config.json)")
    io.add_argument("--output", required=True, type=Path, help="folder to create for the merged model")
    io.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    io.add_argument("--one-pass", action="store_true", dest="one_pass",
                    help="read each input once (about half the bytes, what the daemon does): hash and check the "
                    "inputs while merging instead of in a pass before it; a bad input or lineage is then refused "
                    "after the merge pass instead of before it (still nothing written)")
    io.add_argument("--max-shard-size", type=parse_size,
                    help="split the output into shards of at most this size (default: as the base, i.e. its "
                    "largest shard when it is sharded, else 5GB)")
    m = p.add_argument_group("method (default: the previous step's, else nufilt)")
    m.add_argument("--method", choices=list(METHODS))
    m.add_argument("--seed", type=int, help="seed of NUFILT's adapter init (default: previous step's, else 0)")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N; with --executor "
                   "ray the tasks': cpu (auto) or cuda (one GPU each, assigned by the cluster)")
    m.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use): NUFILT "
                   "merges that many matrices at once, one thread each, with the same output for any number; other "
                   "methods use them inside each matrix. On a shared host give only the free cores")
    m.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where NUFILT's matrices are merged: local (this process, --threads) or ray (one Ray task each "
                   "on the cluster at --ray-address; pip install 'nufilt[ray]'); the same output either way")
    m.add_argument("--ray-address", dest="ray_address", metavar="HOST:PORT",
                   help="the Ray head (`ray start --head` prints it) or ray://HOST:PORT; default: RAY_ADDRESS, else a "
                   "Ray instance started on this host for the step. An unreachable head fails at once (exit 78)")
    n = p.add_argument_group("NUFILT settings (a new lineage: the profile's; a later step: the previous step's)")
    n.add_argument("--profile", choices=list(PROFILES),
                   help=f"named settings: {DEFAULT_PROFILE} (default), the paper's method with every Linear weight "
                   "filtered, the rest averaged, r_p 32, each merged task vector rescaled with a trust radius of "
                   "0.03 and flattened where shrunk (--set trust_radius=0.05, --set flat_spectrum=false), and "
                   "LoRA adapter arrivals filtered two-sided at the mean-norm target (--set "
                   "adapter_arrivals=as-full: as full fine-tunes); plus, without the flattening and the adapter "
                   "rule; paper, the paper's NUFILT. Explicit settings override it")
    n.add_argument("--null-rank", type=int, dest="null_rank",
                   help="r_p, earlier-task directions filtered (paper 128, plus 32)")
    n.add_argument("--lora-rank", type=int, dest="lora_rank", help="r_l, adapter rank; 0 = filter only (64)")
    n.add_argument("--task-rank", type=int, dest="task_rank", help="r_v, new-task directions in the loss (8)")
    n.add_argument("--iters", type=int, help="Adam steps per matrix (50; also WUDI's, 50)")
    n.add_argument("--lr", type=float, help="Adam learning rate (1e-3; also WUDI's, 1e-5)")
    n.add_argument("--include", action="append", metavar="REGEX",
                   help="filter tensors whose name matches (re.search); repeatable; overrides --preset")
    n.add_argument("--preset", choices=["auto", "all-linear", *PRESETS],
                   help="tensor-name preset (paper: auto, detected from the names, unknown names: all Linear "
                   "weights; plus: all-linear)")
    n.add_argument("--policy", choices=["keep_base", "keep_previous", "average"],
                   help="what the tensors NUFILT does not filter become (paper keep_base, plus average)")
    b = p.add_argument_group("baseline settings")
    b.add_argument("--scale", type=float, help="λ of task_arithmetic/ties (0.3) and magmax (0.5)")
    b.add_argument("--alpha", type=float, help="OPCM's α (0.5)")
    p.add_argument("--set", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
                   help="any other method setting (JSON values), e.g. --set lambda_old=2, --set null_space=false, "
                   "--set first_step=published_code, TIES' --set topk=0.2 --set merge_func=sum")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    p.add_argument("--json", action="store_true", help="print the lineage record as JSON at the end")
    p.set_defaults(func=cmd_merge)


def merge_options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("profile", "null_rank", "lora_rank", "task_rank", "iters", "lr", "preset", "policy", "scale", "alpha")
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.include:
        options["include"] = tuple(args.include)
    options.update(dict(args.set))
    return options


class ProgressPrinter:
    """One line per tensor on a log, an updating line on a terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        last_of_phase = p.index == p.total
        if p.phase == "check" and not (self.tty or last_of_phase) and now - self.last < 5:
            return  # hashing is fast and long; on a log, one line every 5 s is enough
        self.last = now
        line = f"[{p.phase:<10} {p.index:>5}/{p.total:<5} {p.elapsed:7.1f}s] {p.name}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:200] + ("\n" if last_of_phase else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def cmd_merge(args: argparse.Namespace) -> int:
    interrupts.unwind_on_signals()  # SIGTERM unwinds like Ctrl-C: merge_step removes its hidden temporary output
    set_threads(args.threads)
    req = MergeRequest(
        base=args.base, checkpoint=args.checkpoint, output=args.output, previous=args.previous,
        method=args.method, options=merge_options(args), seed=args.seed, device=args.device,
        max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, check_first=not args.one_pass,
        workers=args.threads, executor=args.executor, ray_address=args.ray_address)
    result = merge_step(req, ProgressPrinter(args.quiet))
    r = result.record
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"merged step {r.step} with {r.method} into {result.output}: {len(Checkpoint.open(result.output).tensors)} "
          f"tensors in {r.duration_seconds:.1f}s ({secs}) on {r.device}; peak RSS "
          f"{r.peak_rss_bytes / 1024**2:.0f} MiB", file=sys.stderr)
    if r.summary:
        print("  " + ", ".join(f"{k}={v}" for k, v in r.summary.items()), file=sys.stderr)
    if args.json:
        print(r.to_json(), end="")
    return 0


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list a checkpoint's tensors and its lineage record",
                       description="Print the tensors (name, dtype, shape, size) of a checkpoint or merged "
                       "model and, for a merged model, its lineage record.")
    p.add_argument("path", type=Path, help="a .safetensors file, a folder, or an index file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = Checkpoint.open(args.path)
    try:
        record: dict[str, Any] | None = json.loads(LineageRecord.read(ckpt.directory).to_json())
    except NufiltError:
        record = None
    infos = list(ckpt.tensors.values())
    tensors = [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "bytes": i.nbytes} for i in infos]
    total = sum(i.nbytes for i in infos)
    if args.json:
        print(json.dumps({"path": str(args.path), "files": [str(f) for f in ckpt.weight_files()],
                          "tensors": tensors, "total_bytes": total, "lineage": record}, indent=2))
        return 0
    width = max((len(i.name) for i in infos), default=4)
    for i in infos:
        print(f"{i.name:<{width}}  {i.dtype:<5} {list(i.shape)!s:<18} {i.nbytes / 1024**2:10.2f} MiB")
    n_params = sum(i.numel for i in ckpt.tensors.values())
    print(f"{len(tensors)} tensors, {n_params:,} values, {total / 1024**2:.1f} MiB in "
          f"{len(ckpt.weight_files())} file(s)")
    if record:
        print(f"\nlineage ({LINEAGE_NAME}): step {record['step']} of method {record['method']}, seed {record['seed']}")
        print(f"  base        {record['base']['sha256'][:16]}  {record['base']['path']}")
        for t, c in enumerate(record["checkpoints"], 1):
            print(f"  step {t:<6} {c['sha256'][:16]}  {c['path']}")
        print(f"  settings    {json.dumps(record['settings'])}")
        if record["method_state"]:
            print(f"  state       {json.dumps(record['method_state'])}")
        print(f"  merged by {record['tool']} on {record['device']} at {record['created_at']} "
              f"in {record['duration_seconds']}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nufilt", description="Data-free continual model merging with NUFILT (arXiv 2509.21413).")
    parser.add_argument("--version", action="version", version=f"nufilt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_merge_parser(sub)
    add_inspect_parser(sub)
    add_demo_parser(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at interpreter exit
        return rc
    except NufiltError as e:
        print(f"nufilt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        interrupts.clear()
        print("nufilt: interrupted; no output was written", file=sys.stderr)  # SIGINT or SIGTERM
        return 130
    except BrokenPipeError:
        # the reader closed the pipe (`nufilt history | head`): it has what it wanted. Point stdout at
        # /dev/null so the flush at exit does not raise again (Python's documented recipe for SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
