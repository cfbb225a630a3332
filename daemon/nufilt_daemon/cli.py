"""The `nufilt` command: the core's `merge` and `inspect`, plus the daemon's commands.

    nufilt daemon   [--config FILE] [--check]   run the service (or only validate the config)
    nufilt status   [--config FILE] [--json]    production version, step, queue, last outcome
    nufilt history  [--config FILE] [--json]    jobs and production changes, newest first
    nufilt rollback [--config FILE]             production back one version
    nufilt submit PATH [--config FILE]          copy a checkpoint into the inbox safely

status, history and rollback read the journal and the store directly: they work whether the
daemon runs or not. Here: the parser and the commands; what status and history show is in status.py,
submit's copy into the inbox and its --wait in submit.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.cli import build_parser as build_core_parser
from nufilt_core.cli import run
from nufilt_core.errors import NufiltError
from nufilt_core.interrupts import unwind_on_signals
from nufilt_core.ray_executor import check_ray

from . import evaluate
from .config import CONFIG_ENV, load_settings
from .promoter import Promoter
from .status import (
    history_dict,
    job_history,
    open_store_and_journal,
    print_history,
    print_job_history,
    print_status,
    status_data,
)
from .store import StoreError, version_name
from .submit import submit_checkpoint
from .supervisor import Daemon, publishing_enabled

CONFIG_HELP = (f"TOML config file (default: ${CONFIG_ENV}; without either, the built-in defaults: folders "
               "nufilt-inbox, nufilt-store, nufilt-state relative to the current directory); NUFILT_* environment "
               "variables override it")

DAEMON_EPILOG = """\
examples:
  # the smallest setup: a base model and the default folders (nufilt-inbox/, nufilt-store/, nufilt-state/)
  NUFILT_BASE_MODEL=models/base nufilt daemon
  # with a config file, checked first
  nufilt daemon --config /etc/nufilt/nufilt.toml --check
  nufilt daemon --config /etc/nufilt/nufilt.toml

Then drop checkpoints into the inbox (`nufilt submit PATH`, or write elsewhere and `mv`);
each becomes a new version under STORE/versions/ and STORE/production once validated.
Metrics: http://127.0.0.1:9180/metrics. Logs: JSON lines on stderr (a console format on a TTY).
Every setting is documented in docs/daemon.md.
"""


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the service: watch, merge, validate, promote",
                       description="Watch the inbox (and an MLflow registry, if configured); merge each new "
                       "checkpoint into the production model, validate it, promote it.",
                       epilog=DAEMON_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--check", action="store_true", help="validate the configuration, print it (secrets masked), "
                   "and exit")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", help="production version, step, queue and last outcome",
                       description="Where the service stands: production version and its step, jobs waiting, "
                       "the last finished job, whether a daemon is running.")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("history", help="jobs and production changes, newest first",
                       description="Every checkpoint that arrived, with its outcome and reason, and every "
                       "promotion and rollback.",
                       epilog="examples:\n  nufilt history --limit 5\n"
                       "  nufilt history --job 7   # one job's state transitions, with reasons",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--limit", type=int, default=20, help="how many jobs (default 20)")
    p.add_argument("--job", type=int, help="show one job with all its state transitions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("rollback", help="move production back one version",
                       description="Point STORE/production back at the version the current one was merged from "
                       "(and the MLflow alias, if configured). Later merges continue from there. Recorded in the "
                       "journal; works whether the daemon runs or not.")
    add_config_arg(p)
    p.add_argument("--reason", help="why, for the history")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("submit", help="copy a checkpoint into the inbox safely",
                       description="Copy a .safetensors file or a checkpoint folder into the inbox under a "
                       "temporary name on the same filesystem, then rename it into place, so the daemon never "
                       "sees a half-copied checkpoint.",
                       epilog="example:\n  nufilt submit runs/task7/checkpoint-final --name task7",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a .safetensors file or a folder (single file or shards + index)")
    add_config_arg(p)
    p.add_argument("--name", help="name in the inbox (default: the source's name)")
    p.add_argument("--wait", action="store_true", help="return once the daemon has decided: print the outcome "
                   "(promoted as vNNNNNN, rejected or failed, with the reason) and the time; exit 0 only if promoted. "
                   "With a model registry, a promotion also waits until it is published there (not while the "
                   "registry fails)")
    p.add_argument("--timeout", type=float, default=3600, help="with --wait: give up after this many seconds "
                   "(default 3600); the checkpoint stays queued")
    p.set_defaults(func=cmd_submit)

    add_eval_parsers(sub)


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model folder, printing JSON metrics (a ready gate.command)",
                       description="Evaluate a Hugging Face model folder and print one JSON object of metrics: the "
                       "form the gate reads from its command, which appends the candidate folder.",
                       epilog=evaluate.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{accuracy,perplexity}")
    a = kinds.add_parser("accuracy", help="a sequence classifier's accuracy on a labelled JSONL or CSV file")
    a.add_argument("--data", type=Path, required=True, help="JSON lines or CSV (with a header) of text and label; "
                   "a label is one of the model's label names or a class index")
    a.add_argument("--text-field", default="text", help="the text's field (default text)")
    a.add_argument("--label-field", default="label", help="the label's field (default label)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--max-length", type=int, default=256, help="tokens per text, longer ones truncated (256)")
    lm = kinds.add_parser("perplexity", help="a causal LM's perplexity on a text file")
    lm.add_argument("--data", type=Path, required=True, help="a UTF-8 text file")
    lm.add_argument("--max-length", type=int, default=512, help="tokens per window (512)")
    for k in (a, lm):
        k.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder's)")
        k.add_argument("model", type=Path, help="the model folder (the gate appends the candidate's)")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = build_core_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    add_daemon_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .logging import configure_logging

    configure_logging("warning")  # commands print their own results; `daemon` reconfigures from its settings
    return run(build_parser(), argv)


# --- daemon ------------------------------------------------------------------------------


DAEMON_UMASK = 0o027


def cmd_daemon(args: argparse.Namespace) -> int:
    from .logging import configure_logging

    settings = load_settings(args.config)
    if args.check:
        print(json.dumps(settings.redacted(), indent=2))
        if settings.base_model is None:
            print("nufilt: error: base_model is not set (NUFILT_BASE_MODEL)", file=sys.stderr)
            return 1
        Checkpoint.open(settings.base_model)  # what the daemon opens at start: a missing base fails here too
        if settings.executor == "ray":
            check_ray(settings.ray_address)  # and the Ray head it would use
        return 0
    # what the daemon writes (journal, versions, logs) is its group's to read at most, as under the systemd unit
    os.umask(os.umask(DAEMON_UMASK) | DAEMON_UMASK)
    configure_logging(settings.log_level, settings.log_format)
    return Daemon(settings).run()


# --- status, history ----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    data = status_data(load_settings(args.config))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_status(data)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _, journal = open_store_and_journal(settings)
    try:
        if args.job is not None:
            history = job_history(journal, args.job)
            if args.json:
                print(json.dumps(history, indent=2))
            else:
                print_job_history(history)
            return 0
        jobs = journal.jobs(limit=args.limit)
        changes = journal.production_changes(limit=args.limit)
    finally:
        journal.close()
    if args.json:
        print(json.dumps(history_dict(jobs, changes), indent=2))
    else:
        print_history(jobs, changes)
    return 0


# --- rollback ----------------------------------------------------------------------------


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store, journal = open_store_and_journal(settings)
    try:
        done = Promoter(store, journal, settings.keep_versions, settings.keep_quarantine,
                        publishing_enabled(settings)).rollback(args.reason)
    except StoreError as e:
        raise NufiltError(str(e)) from None
    finally:
        journal.close()
    print(f"production: {version_name(done.from_version)} → {version_name(done.to_version)} "
          f"({store.production_link} → {os.readlink(store.production_link)})")
    if publishing_enabled(settings):
        print("the MLflow alias follows as soon as the daemon reaches the registry")
    return 0


# --- eval --------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    if args.kind == "accuracy":
        metrics = evaluate.accuracy(args.model, args.data, args.tokenizer, args.text_field, args.label_field,
                                    args.batch_size, args.max_length)
    else:
        metrics = evaluate.perplexity(args.model, args.data, args.tokenizer, args.max_length)
    print(json.dumps(metrics))
    return 0


# --- submit ------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    unwind_on_signals()  # SIGTERM unwinds: the temporary copy is removed
    return submit_checkpoint(settings, args.path, args.name, args.wait, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
