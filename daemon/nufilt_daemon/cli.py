"""The `nufilt` command: the core's `merge` and `inspect`, plus the daemon's commands.

    nufilt daemon   [--config FILE] [--check]   run the service (or only validate the config)
    nufilt status   [--config FILE] [--json]    production version, step, queue, last outcome
    nufilt history  [--config FILE] [--json]    jobs and production changes, newest first
    nufilt rollback [--config FILE]             production back one version
    nufilt submit PATH [--config FILE]          copy a checkpoint into the inbox safely

status, history and rollback read the journal and the store directly: they work whether the
daemon runs or not.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import stat
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.cli import build_parser as build_core_parser
from nufilt_core.cli import run
from nufilt_core.errors import NufiltError
from nufilt_core.fsutil import rename_no_replace
from nufilt_core.interrupts import check_for_stop, unwind_on_signals
from nufilt_core.methods import get_method, resolve_settings

from .config import CONFIG_ENV, Settings, load_settings
from .intake import content_hash
from .journal import JOURNAL_NAME, Job, Journal, JournalError
from .names import printable
from .promoter import Promoter
from .states import ACTIVE_STATES, FINAL_STATES, JobState, OutboxKind
from .store import Store, StoreError, version_name
from .supervisor import Daemon, publishing_enabled, state_paths

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
        return 0
    # what the daemon writes (journal, versions, logs) is its group's to read at most, as under the systemd unit
    os.umask(os.umask(DAEMON_UMASK) | DAEMON_UMASK)
    configure_logging(settings.log_level, settings.log_format)
    return Daemon(settings).run()


# --- status ------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def _short(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def daemon_state(settings: Settings) -> dict[str, Any]:
    """Running or not, by trying the daemon's lock (a stale pid file cannot fool this)."""
    paths = state_paths(Path(settings.state_dir))
    if not paths["lock"].exists():
        return {"running": False}
    with paths["lock"].open("r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
            return {"running": False}
        except BlockingIOError:
            pass
    try:
        info = json.loads(paths["info"].read_text())
    except (OSError, ValueError):
        info = {}
    if isinstance(info.get("started_at"), int | float):
        info["started_at"] = _iso(info["started_at"])
    return {"running": True, **info}


def merged_checkpoint(journal: Journal, sha256: str, merged_path: str) -> dict[str, Any]:
    """One checkpoint of production's lineage, by what the user submitted (the journal's job), not by
    the daemon's staged copy the merge read, which is deleted once the job ends."""
    job = journal.latest_with_content(sha256)
    if job is not None and job.duplicate_of is not None:  # dropped again later: the job that merged it
        job = journal.job(job.duplicate_of)
    if job is None:
        return {"sha256": sha256, "path": merged_path}
    return {"sha256": sha256, "job": job.id, "source": job.source, "reference": job.reference}


def job_dict(job: Job) -> dict[str, Any]:
    d = dict(job.__dict__)
    for k in ("created_at", "updated_at", "started_at", "finished_at"):
        d[k] = _iso(d[k])
    return d


def _open(settings: Settings) -> tuple[Store, Journal]:
    state = Path(settings.state_dir).absolute()
    if not (state / JOURNAL_NAME).exists():
        if settings.toml_file is not None:
            raise JournalError(f"{state / JOURNAL_NAME}: no journal here (state_dir of {settings.toml_file}); "
                               "has the daemon run with this configuration?")
        raise JournalError(f"{state / JOURNAL_NAME}: no journal here (no configuration file: state_dir is "
                           f"NUFILT_STATE_DIR or the default, relative to {Path.cwd()}); point the command at the "
                           f"daemon's configuration with --config FILE or {CONFIG_ENV}=FILE")
    return Store(settings.store_dir), Journal.in_state_dir(state, create=False)


def next_merge(settings: Settings, production: dict[str, Any] | None,
               inherited: dict[str, Any] | None) -> dict[str, Any]:
    """The method, the explicit settings the next merge step passes, the settings it will merge with (those over
    what it inherits from the lineage, `inherited`, or the method's defaults at a first step), and where they come
    from: after an upgrade, the operator sees whether a running lineage keeps its settings. `settings` is None
    with an `error` when the step would refuse them."""
    options = settings.step_options()
    out: dict[str, Any] = {"method": settings.method, "options": options}
    try:
        resolved = resolve_settings(get_method(settings.method), inherited or {}, options)
        out["settings"] = resolved.model_dump(mode="json")
    except NufiltError as e:
        out.update(settings=None, error=str(e))
    if settings.method_settings is not None:
        source = "method_settings, at every step"
    elif production is None:
        source = "a new lineage's settings (method_settings unset)"
    else:
        unreadable = f", whose record is unreadable: {production['error']}" if "error" in production else ""
        source = f"inherited from the lineage of production {production.get('name', '?')}{unreadable} " \
                 "(method_settings unset)"
    return {**out, "source": source}


def status_data(settings: Settings) -> dict[str, Any]:
    store, journal = _open(settings)
    try:
        production: dict[str, Any] | None = None
        inherited: dict[str, Any] | None = None
        try:
            prod = store.production()
        except StoreError as e:  # show everything else all the same
            prod, production = None, {"error": str(e)}
        if prod is not None:
            production = {"version": prod.number, "name": prod.name, "path": str(prod.path.absolute())}
            try:
                rec = prod.lineage()
                inherited = rec.settings
                production.update(step=rec.step, method=rec.method, profile=rec.settings.get("profile"),
                                  created_at=rec.created_at,
                                  checkpoints=[merged_checkpoint(journal, c.sha256, c.path) for c in rec.checkpoints])
            except NufiltError as e:
                production["error"] = str(e)
            production["scores"] = prod.report().get("scores")
        counts = journal.counts()
        last = journal.last_finished()
        daemon = daemon_state(settings)
        inbox: dict[str, Any] = {"entries": [], "sources": {}, "storage": {}}
        if daemon["running"]:  # written by the daemon at each tick; stale once it stopped
            try:
                inbox.update(json.loads(state_paths(Path(settings.state_dir))["inbox"].read_text()))
            except (OSError, ValueError):
                pass
        for entry in inbox["entries"]:  # one time format in the JSON: ISO 8601, UTC
            if isinstance(entry.get("seen_at"), int | float):
                entry["seen_at"] = _iso(entry["seen_at"])
        return {
            "production": production,
            "queue": {s: counts[s] for s in ACTIVE_STATES},
            "totals": counts,
            "last": job_dict(last) if last else None,
            "next_merge": next_merge(settings, production, inherited),
            "pending_publications": len(journal.outbox_pending()),
            "inbox": inbox,
            "daemon": daemon,
        }
    finally:
        journal.close()


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    data = status_data(settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    p = data["production"]
    if p and "name" not in p:
        print(f"production  unreadable: {p['error']}")
    elif p:
        profile = f" {p['profile']}" if p.get("profile") else ""
        print(f"production  {p['name']} (step {p.get('step', '?')}, {p.get('method', '?')}{profile}), {p['path']}")
    else:
        print("production  none yet (no checkpoint has been promoted)")
    n = data["next_merge"]
    if n["settings"] is None:
        merges_with = f"refused: {n['error']}"
    else:
        profile = n["settings"].get("profile")
        merges_with = (f"profile {profile}" if profile else "settings") + \
            (f", explicitly {json.dumps(n['options'])}" if n["options"] else "")
    print(f"next merge  {n['method']} {merges_with}: {n['source']}")
    q = data["queue"]
    print("queue       " + ", ".join(f"{q[s]} {s}" for s in ACTIVE_STATES))
    last = data["last"]
    if last:
        what = f"{last['state']}" + (f" as {version_name(last['version'])}" if last["version"] else "")
        why = f": {last['reason']}" if last["reason"] and last["state"] != JobState.PROMOTED else ""
        finished = datetime.fromisoformat(last["finished_at"]).timestamp() if last["finished_at"] else None
        print(f"last        job {last['id']} {what}, {_ago(finished)} ({printable(last['reference'])})"
              f"{printable(why)}")
    t = data["totals"]
    print("totals      " + ", ".join(f"{t[s]} {s}" for s in FINAL_STATES))
    inbox = data["inbox"]
    for e in inbox["entries"]:
        print(f"inbox       {printable(str(e['name']))}: {e['state']}"
              + (f" ({printable(str(e['reason']))})" if e.get("reason") else ""))
    for name, h in inbox["sources"].items():
        if not h.get("healthy", True):
            print(f"source      {name} UNHEALTHY: {h.get('errors_total', '?')} error(s), last: "
                  f"{printable(str(h.get('last_error')))}")
    for problem in inbox["storage"].values():
        print(f"storage     {printable(problem)}")
    if data["pending_publications"]:
        print(f"registry    {data['pending_publications']} update(s) waiting to be published")
    d = data["daemon"]
    print(f"daemon      running, pid {d.get('pid', '?')}, metrics {d.get('metrics_url') or 'off'}"
          if d["running"] else "daemon      not running")
    return 0


# --- history -----------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _, journal = _open(settings)
    try:
        if args.job is not None:
            job = journal.job(args.job)
            if job is None:
                raise NufiltError(f"no job {args.job} in {journal.path}")
            steps = [{"from": f, "to": t, "reason": r, "at": _iso(at)} for f, t, r, at in journal.transitions(job.id)]
            if args.json:
                print(json.dumps({**job_dict(job), "transitions": steps}, indent=2))
            else:
                for k, v in job_dict(job).items():
                    print(f"{k:<13} {printable(str(v))}")
                print("transitions")
                for st in steps:
                    print(f"  {st['at']}  {st['from'] or '-':>10} → {st['to']:<10} {printable(st['reason'] or '')}")
            return 0
        jobs = journal.jobs(limit=args.limit)
        changes = journal.production_changes(limit=args.limit)
    finally:
        journal.close()
    if args.json:
        print(json.dumps({"jobs": [job_dict(j) for j in jobs],
                          "production_changes": [{**c.__dict__, "at": _iso(c.at)} for c in changes]}, indent=2))
        return 0
    print(f"{'job':>5}  {'state':<10} {'version':<8} {'step':>4}  {'source':<7} {'finished':<20} checkpoint / reason")
    for j in jobs:
        ver = version_name(j.version) if j.version else "-"
        reason = f"  ({printable(j.reason)})" if j.reason and j.state != JobState.PROMOTED else ""
        print(f"{j.id:>5}  {j.state:<10} {ver:<8} {j.step or '-':>4}  {j.source:<7} "
              f"{_short(j.finished_at):<20} {printable(j.reference)}{reason}")
    if changes:
        print("\nproduction changes")
        for c in changes:
            src = version_name(c.from_version) if c.from_version else "none"
            extra = f" (job {c.job_id})" if c.job_id else f" ({printable(c.reason)})" if c.reason else ""
            print(f"  {_short(c.at)}  {c.kind:<8} {src} → {version_name(c.to_version)}{extra}")
    return 0


# --- rollback ----------------------------------------------------------------------------


def cmd_rollback(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store, journal = _open(settings)
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


# --- submit ------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _share_with_group(path: Path) -> None:
    """The copy in the inbox readable by the daemon's group (a shared inbox, deploy/README.md), whatever the
    trainer's umask or the writer (safetensors saves 0600): files g+r, folders g+rwx, so that the daemon can
    read the files and move the folder out of the inbox once it is journaled."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        mode = os.lstat(p).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(p, stat.S_IMODE(mode) | stat.S_IRWXG)
        elif stat.S_ISREG(mode):
            os.chmod(p, stat.S_IMODE(mode) | stat.S_IRGRP)


def _copy_unless_stopped(src: str, dst: str) -> str:
    check_for_stop()
    return shutil.copy2(src, dst)


def cmd_submit(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    unwind_on_signals()  # SIGTERM unwinds: the temporary copy is removed
    src: Path = args.path
    if not src.exists() and not src.is_symlink():
        raise NufiltError(f"{src}: does not exist")
    # what the daemon will accept, refused here with the same reason (a pickle with the conversion command)
    Checkpoint.open(src, strict=True)
    # with --wait: the content's identity and the journal's last job of it, taken before the copy is
    # renamed into the inbox, where the daemon may journal it at once
    mark = journal_mark(settings, src) if args.wait else None
    inbox = Path(settings.watch_dir)
    inbox.mkdir(parents=True, exist_ok=True)
    name = args.name or src.name
    if src.is_file() and not name.endswith(".safetensors"):
        name += ".safetensors"
    if name.startswith((".", "tmp-")) or name.endswith(".partial"):
        raise NufiltError(f"{name}: the inbox ignores hidden and temporary names; choose another --name")
    dest = inbox / name
    if dest.exists():
        raise NufiltError(f"{dest}: already in the inbox (pass --name to choose another name)")
    tmp = inbox / f"tmp-{uuid.uuid4().hex[:8]}-{name}"  # ignored by the watcher until renamed
    try:
        if src.is_dir():
            # a link swapped in since the check is refused, not followed; a stop is honoured between files
            shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_unless_stopped)
        else:
            shutil.copy2(src, tmp)
        _share_with_group(tmp)
        _fsync_tree(tmp)
        try:  # never over an entry another submit renamed in meanwhile
            rename_no_replace(tmp, dest)
        except FileExistsError:
            raise NufiltError(f"{dest}: already in the inbox (pass --name to choose another name)") from None
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    print(f"submitted {src} as {dest}", flush=True)
    return wait_for_outcome(settings, *mark, args.timeout) if mark else 0


def _lookup(settings: Settings, sha: str, after: int) -> tuple[Job | None, Job | None]:
    """(newest job of this content above id `after`, the job it duplicates if it is a duplicate)."""
    path = Path(settings.state_dir) / JOURNAL_NAME
    if not path.exists():  # the daemon has not started yet
        return None, None
    journal = Journal(path, create=False)
    try:
        job = journal.latest_with_content(sha, after)
        first = journal.job(job.duplicate_of) if job and job.duplicate_of is not None else None
        return job, first
    finally:
        journal.close()


def journal_mark(settings: Settings, src: Path) -> tuple[str, int]:
    """(content hash, id of the last job of that content so far): jobs up to it are not this submission's."""
    sha = content_hash(src)  # the identity the daemon journals (the copy in the inbox has the same)
    earlier, _ = _lookup(settings, sha, 0)
    return sha, earlier.id if earlier else 0


def wait_for_outcome(settings: Settings, sha: str, after: int, timeout: float) -> int:
    """Follow the submitted content through the journal until it is promoted, rejected or failed."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        job, first = _lookup(settings, sha, after)
        took = f"{time.monotonic() - t0:.1f} s"
        if job is not None and job.state == JobState.DUPLICATE:
            print(f"duplicate of job {job.duplicate_of} ({first.state if first else '?'}), never merged twice")
            return 0 if first is not None and first.state == JobState.PROMOTED else 1
        if job is not None and job.state != last:
            last = job.state
            if job.state == JobState.PROMOTED and job.version is not None:
                print(f"promoted as {version_name(job.version)} (step {job.step}) in {took}", flush=True)
                wait_for_publication(settings, job.version, t0, timeout)
                return 0
            if job.state in FINAL_STATES:
                print(f"{job.state} after {took}: {printable(job.reason or '')}")
                return 1
        time.sleep(0.5)
    print(f"still {last or 'not journaled'} after {timeout:g} s; it stays in the daemon's hands "
          "(follow it with `nufilt status`)", file=sys.stderr)
    return 1


def wait_for_publication(settings: Settings, version: int, t0: float, timeout: float) -> None:
    """With a registry (the promotion queued a publish item in the journal): until the daemon has
    published `version` and moved the production alias to it, so that what the user looks at next
    (the registry) agrees. Not while the registry fails: that is said once and left to the daemon."""
    while time.monotonic() - t0 < timeout:
        journal = Journal(Path(settings.state_dir) / JOURNAL_NAME, create=False)
        try:
            pending = journal.outbox_pending()
            mine = next((i for i in pending if i.kind == OutboxKind.PUBLISH and i.version == version), None)
            registry_version = journal.registry_version_of(version) if mine is None else None
        finally:
            journal.close()
        took = f"{time.monotonic() - t0:.1f} s"
        if mine is None:  # published, skipped, or no registry configured
            if registry_version is not None:
                print(f"published to the model registry as version {registry_version} in {took}")
            return
        failing = [i for i in pending if i.id <= mine.id and i.attempts > 0]  # in order: earlier ones block it
        if failing:
            print(f"not published to the model registry yet ({printable(failing[0].last_error or '?')}); the "
                  "daemon retries (`nufilt status` shows what waits)")
            return
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
