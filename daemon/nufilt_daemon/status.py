"""What `nufilt status` and `nufilt history` show: read from the journal, the store and the daemon's state files
directly, so they answer whether the daemon runs or not. The data (also their `--json`) and its text form."""

from __future__ import annotations

import fcntl
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nufilt_core.errors import NufiltError
from nufilt_core.methods import get_method, resolve_settings

from .config import CONFIG_ENV, Settings
from .journal import JOURNAL_NAME, Job, Journal, JournalError, ProductionChange
from .names import printable
from .states import ACTIVE_STATES, FINAL_STATES, JobState
from .store import Store, StoreError, version_name
from .supervisor import state_paths


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def _short(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def open_store_and_journal(settings: Settings) -> tuple[Store, Journal]:
    """The daemon's store and journal, for a command: an error that says where it looked when there is no
    journal (the command pointed at another configuration than the daemon's)."""
    state = Path(settings.state_dir).absolute()
    if not (state / JOURNAL_NAME).exists():
        if settings.toml_file is not None:
            raise JournalError(f"{state / JOURNAL_NAME}: no journal here (state_dir of {settings.toml_file}); "
                               "has the daemon run with this configuration?")
        raise JournalError(f"{state / JOURNAL_NAME}: no journal here (no configuration file: state_dir is "
                           f"NUFILT_STATE_DIR or the default, relative to {Path.cwd()}); point the command at the "
                           f"daemon's configuration with --config FILE or {CONFIG_ENV}=FILE")
    return Store(settings.store_dir), Journal.in_state_dir(state, create=False)


# --- status ------------------------------------------------------------------------------


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
    store, journal = open_store_and_journal(settings)
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


def print_status(data: dict[str, Any]) -> None:
    """`status_data` as the lines `nufilt status` prints."""
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


# --- history -----------------------------------------------------------------------------


def job_history(journal: Journal, job_id: int) -> dict[str, Any]:
    """One job with all its state transitions, oldest first."""
    job = journal.job(job_id)
    if job is None:
        raise NufiltError(f"no job {job_id} in {journal.path}")
    steps = [{"from": f, "to": t, "reason": r, "at": _iso(at)} for f, t, r, at in journal.transitions(job.id)]
    return {**job_dict(job), "transitions": steps}


def print_job_history(history: dict[str, Any]) -> None:
    """`job_history` as the lines `nufilt history --job N` prints."""
    steps = history["transitions"]
    for k, v in history.items():
        if k != "transitions":
            print(f"{k:<13} {printable(str(v))}")
    print("transitions")
    for st in steps:
        print(f"  {st['at']}  {st['from'] or '-':>10} → {st['to']:<10} {printable(st['reason'] or '')}")


def history_dict(jobs: list[Job], changes: list[ProductionChange]) -> dict[str, Any]:
    """The jobs and production changes, newest first, as `nufilt history --json` prints them."""
    return {"jobs": [job_dict(j) for j in jobs],
            "production_changes": [{**c.__dict__, "at": _iso(c.at)} for c in changes]}


def print_history(jobs: list[Job], changes: list[ProductionChange]) -> None:
    """The jobs and production changes, newest first, as the table `nufilt history` prints."""
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
