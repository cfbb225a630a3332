"""The MLflow source, publisher and webhook against a real `mlflow server` (SQLite, loopback).

One server for the module (a start costs ~20 s here); each test uses its own registered model
names, so they do not depend on each other's order. Checkpoints are tiny BERT-shaped safetensors
models from tests/models.py, logged as run artifacts and registered as model versions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from daemon_harness import wait_for
from mlflow_server import MlflowServer
from models import base_state, finetune, load, write_model
from nufilt_daemon.config import MlflowSettings
from nufilt_daemon.journal import Journal
from nufilt_daemon.mlflow_connection import registry_client
from nufilt_daemon.publishers.mlflow import MlflowPublisher, lineage_tags
from nufilt_daemon.sources.base import Arrival
from nufilt_daemon.sources.mlflow_registry import MlflowRegistrySource, cursor_key
from nufilt_daemon.webhook import WebhookServer
from pydantic import SecretStr

from nufilt_core.checkpoint import LINEAGE_NAME
from nufilt_core.merge import MergeRequest, MergeResult, merge_step

pytestmark = pytest.mark.slow
WAIT_SECONDS = 60.0


# --- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    env = {  # let this server deliver webhooks to a plain-http loopback listener, with no stale cache
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), extra_env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: MlflowServer):
    return registry_client(server.url)


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return base_state()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def register(client, model: str, state: dict[str, torch.Tensor], workdir: Path, *, shards: int = 1,
             artifact_path: str = "checkpoint") -> str:
    """Log `state` as a checkpoint folder in a run and register it as the next version of `model`."""
    return register_folder(client, model, write_model(state, workdir / uuid.uuid4().hex[:8], shards=shards),
                           artifact_path)


def register_folder(client, model: str, folder: Path, artifact_path: str = "checkpoint") -> str:
    """Log `folder` as artifacts of a run under `artifact_path` and register it as the next version of `model`."""
    try:
        client.create_registered_model(model)
    except Exception as e:
        if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    experiment = client.get_experiment_by_name("fine-tunes") or client.get_experiment(
        client.create_experiment("fine-tunes"))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), artifact_path)
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(model, f"runs:/{run.info.run_id}/{artifact_path}", run.info.run_id,
                                     await_creation_for=0)
    return str(mv.version)


def set_status(server: MlflowServer, model: str, version: str, status: str) -> None:
    """Change a version's status in the server's own database: how a registry still copying
    artifacts (PENDING_REGISTRATION) or one that failed looks to every client."""
    with sqlite3.connect(server.db_path, timeout=30) as db:
        changed = db.execute("UPDATE model_versions SET status = ? WHERE name = ? AND version = ?",
                             (status, model, int(version))).rowcount
    assert changed == 1


class Collector:
    """An `emit` that records each arrival with the tensors read from its path at that moment."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[Arrival, dict[str, torch.Tensor]]] = []
        self.lock = threading.Lock()

    def __call__(self, arrival: Arrival) -> None:
        tensors = load(arrival.path)
        assert tensors, f"{arrival.path}: emitted without any weights"
        with self.lock:
            self.arrivals.append((arrival, tensors))

    @property
    def references(self) -> list[str]:
        with self.lock:
            return [a.reference for a, _ in self.arrivals]


def settings_for(server: MlflowServer, **kw) -> MlflowSettings:
    return MlflowSettings(tracking_uri=server.url, **kw)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the source ----------------------------------------------------------------------------

def test_versions_arrive_in_order_with_their_files(server, client, base, tmp_path):
    model = unique("src")
    states = [finetune(base, i) for i in range(1, 4)]
    register(client, model, states[0], tmp_path)
    register(client, model, states[1], tmp_path, shards=2)  # shards + index
    register(client, model, states[2], tmp_path, artifact_path="model/weights")  # nested deeper
    journal = Journal(tmp_path / "journal.db")
    downloads = tmp_path / "downloads"
    source = MlflowRegistrySource(settings_for(server, source_model=model), downloads, journal)
    emit = Collector()

    assert source.poll_once(emit) == 3
    assert emit.references == [f"models:/{model}/{v}" for v in (1, 2, 3)]
    for (arrival, tensors), state in zip(emit.arrivals, states, strict=True):
        assert arrival.source == "mlflow"
        assert same(tensors, state)
    assert journal.get_state(cursor_key(model)) == "3"
    assert [p.name for p in downloads.iterdir()] == []  # handed over, nothing left behind
    assert source.poll_once(emit) == 0 and len(emit.arrivals) == 3


def test_a_logged_model_version_arrives_too(server, client, base, tmp_path):
    """MLflow 3's own way (`log_model(..., registered_model_name=...)`): the version's source is a
    logged model `models:/m-…`, not a run's artifact folder."""
    model = unique("logged")
    state = finetune(base, 7)
    folder = write_model(state, tmp_path / "ckpt")
    experiment = client.get_experiment_by_name("fine-tunes") or client.get_experiment(
        client.create_experiment("fine-tunes"))
    logged = client.create_logged_model(experiment.experiment_id, name="bert-ft")
    client.log_model_artifacts(logged.model_id, str(folder))
    client.finalize_logged_model(logged.model_id, "READY")
    client.create_registered_model(model)
    client.create_model_version(model, f"models:/{logged.model_id}", model_id=logged.model_id, await_creation_for=0)
    source = MlflowRegistrySource(settings_for(server, source_model=model), tmp_path / "dl",
                                  Journal(tmp_path / "journal.db"))
    emit = Collector()
    assert source.poll_once(emit) == 1
    assert same(emit.arrivals[0][1], state)


def test_pending_version_holds_back_later_ones_and_failed_is_skipped(server, client, base, tmp_path):
    model = unique("pending")
    for i in range(1, 4):
        register(client, model, finetune(base, i), tmp_path)
    set_status(server, model, "2", "PENDING_REGISTRATION")
    journal = Journal(tmp_path / "journal.db")
    source = MlflowRegistrySource(settings_for(server, source_model=model), tmp_path / "dl", journal)
    emit = Collector()

    assert source.poll_once(emit) == 1  # v3 is READY but must not overtake v2
    assert emit.references == [f"models:/{model}/1"]
    assert journal.get_state(cursor_key(model)) == "1"
    assert source.poll_once(emit) == 0

    set_status(server, model, "2", "READY")
    register(client, model, finetune(base, 4), tmp_path)
    set_status(server, model, "4", "FAILED_REGISTRATION")  # never becomes READY: must not block v5
    register(client, model, finetune(base, 5), tmp_path)
    assert source.poll_once(emit) == 3
    assert emit.references == [f"models:/{model}/{v}" for v in (1, 2, 3, 5)]
    assert journal.get_state(cursor_key(model)) == "5"


def test_fallback_without_version_filter_gives_the_same_order(server, client, base, tmp_path):
    model = unique("fallback")
    for i in range(1, 4):
        register(client, model, finetune(base, i), tmp_path)
    journal = Journal(tmp_path / "journal.db")
    journal.set_state(cursor_key(model), "1")
    source = MlflowRegistrySource(settings_for(server, source_model=model), tmp_path / "dl", journal)
    source._filter_supported = False  # what a store that rejects `version_number > N` leads to
    emit = Collector()
    assert source.poll_once(emit) == 2
    assert emit.references == [f"models:/{model}/2", f"models:/{model}/3"]


def test_restart_resumes_at_the_cursor_without_re_emitting(server, client, base, tmp_path):
    model = unique("restart")
    register(client, model, finetune(base, 1), tmp_path)
    register(client, model, finetune(base, 2), tmp_path)
    settings = settings_for(server, source_model=model, poll_interval_seconds=0.2)
    downloads = tmp_path / "downloads"

    first = Collector()
    journal = Journal(tmp_path / "journal.db")
    source = MlflowRegistrySource(settings, downloads, journal)
    source.start(first)
    try:
        wait_for("versions 1 and 2", lambda: len(first.arrivals) == 2, timeout=WAIT_SECONDS)
        assert source.healthy()
    finally:
        source.stop()
    assert not source.healthy()
    journal.close()

    register(client, model, finetune(base, 3), tmp_path)
    (downloads / ".partial-left-by-a-crash").mkdir()
    second = Collector()
    source = MlflowRegistrySource(settings, downloads, Journal(tmp_path / "journal.db"))
    source.start(second)
    try:
        wait_for("version 3 after the restart", lambda: len(second.arrivals) == 1, timeout=WAIT_SECONDS)
        # nothing else may arrive: versions come in order, so anything re-emitted (1, 2, or 3 again)
        # would reach us before a version registered now
        register(client, model, finetune(base, 4), tmp_path)
        wait_for("version 4", lambda: len(second.arrivals) == 2, timeout=WAIT_SECONDS)
        assert second.references == [f"models:/{model}/3", f"models:/{model}/4"]
    finally:
        source.stop()
    assert not (downloads / ".partial-left-by-a-crash").exists()


def test_mlflow_down_counts_errors_backs_off_and_loses_nothing(server, client, base, tmp_path, monkeypatch):
    # fail fast inside MLflow's client, so the back-off measured is ours
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    model = unique("outage")
    register(client, model, finetune(base, 1), tmp_path)
    errors_seen: list[BaseException] = []
    source = MlflowRegistrySource(
        settings_for(server, source_model=model, poll_interval_seconds=3600), tmp_path / "dl",
        Journal(tmp_path / "journal.db"), backoff_initial_seconds=0.2, backoff_max_seconds=0.8,
        on_error=errors_seen.append)
    emit = Collector()
    source.start(emit)
    try:
        wait_for("version 1", lambda: len(emit.arrivals) == 1, timeout=WAIT_SECONDS)
        # registered while the source sleeps, then MLflow goes down before it looks
        register(client, model, finetune(base, 2), tmp_path)
        server.stop()
        source.wake()
        wait_for("three failed polls", lambda: source.errors >= 3, timeout=WAIT_SECONDS)  # retried by back-off alone
        assert source.consecutive_errors >= 3 and source.last_error
        assert len(errors_seen) == source.errors
        assert source.healthy()  # down MLflow is an error count, not a dead source
        assert len(emit.arrivals) == 1

        server.start()
        wait_for("version 2 after MLflow came back", lambda: len(emit.arrivals) == 2, timeout=WAIT_SECONDS)
        assert emit.references == [f"models:/{model}/1", f"models:/{model}/2"]
        wait_for("the error streak to end", lambda: source.consecutive_errors == 0, timeout=WAIT_SECONDS)
        assert source.last_error is None and source.errors >= 3
    finally:
        source.stop()
        server.start()  # whatever happened, leave the server up for the other tests


def test_webhook_from_mlflow_wakes_the_source(server, client, base, tmp_path):
    model = unique("hooked")
    secret = "hook-secret-" + uuid.uuid4().hex
    register(client, model, finetune(base, 1), tmp_path)
    source = MlflowRegistrySource(settings_for(server, source_model=model, poll_interval_seconds=3600),
                                  tmp_path / "dl", Journal(tmp_path / "journal.db"))
    wakes: list[float] = []

    def on_wake() -> None:
        wakes.append(time.monotonic())
        source.wake()

    listener = WebhookServer("127.0.0.1", 0, SecretStr(secret), on_wake)
    listener.start()
    emit = Collector()
    source.start(emit)
    hook = None
    try:
        wait_for("version 1 (first poll at start)", lambda: len(emit.arrivals) == 1, timeout=WAIT_SECONDS)
        hook = client.create_webhook(unique("nufilt"), listener.url, events=["model_version.created"], secret=secret)
        assert client.test_webhook(hook.webhook_id).response_status == 200  # MLflow signs, we accept
        time.sleep(1.2)  # the server caches its webhook list per event for MLFLOW_WEBHOOK_CACHE_TTL=1 s
        wakes.clear()
        register(client, model, finetune(base, 2), tmp_path)
        # the poll interval is an hour: only the webhook can bring version 2 in now
        wait_for("version 2 through the webhook", lambda: len(emit.arrivals) == 2, timeout=30)
        assert wakes and emit.references[-1] == f"models:/{model}/2"
        assert listener.rejected == 0

        # MLflow signing with another secret: 401, no wake
        wrong = client.create_webhook(unique("forged"), listener.url, events=["model_version.created"],
                                      secret="not-" + secret)
        result = client.test_webhook(wrong.webhook_id)
        client.delete_webhook(wrong.webhook_id)
        assert result.response_status == 401 and listener.rejected >= 1
    finally:
        if hook is not None:
            client.delete_webhook(hook.webhook_id)
        source.stop()
        listener.stop()


# --- the publisher -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, base) -> list[MergeResult]:
    """Three real merge steps on the tiny model: what the daemon's store versions hold. Weight
    averaging, because the publisher does not care which method made them and it is the fastest."""
    root = tmp_path_factory.mktemp("merged")
    base_dir = write_model(base, root / "base")
    results: list[MergeResult] = []
    previous = None
    for step in range(1, 4):
        checkpoint = write_model(finetune(base, step), root / f"t{step}")
        result = merge_step(MergeRequest(base=base_dir, checkpoint=checkpoint, output=root / f"v{step:06d}",
                                         previous=previous, method="weight_average", device="cpu"))
        results.append(result)
        previous = result.output
    return results


def aliases(client, model: str) -> dict[str, str]:
    return dict(client.get_registered_model(model).aliases)


def versions_of(client, model: str) -> list[str]:
    return sorted((mv.version for mv in client.search_model_versions(f"name='{model}'")), key=int)


def test_publish_creates_versions_with_aliases_and_lineage_tags(server, client, merged, tmp_path):
    target = unique("production-model")
    publisher = MlflowPublisher(settings_for(server, target_model=target))

    first = publisher.publish(merged[0].output, 1, merged[0].record)
    assert aliases(client, target) == {"production": first}

    second = publisher.publish(merged[1].output, 2, merged[1].record)
    assert second != first
    assert aliases(client, target) == {"production": second, "previous": first}

    mv = client.get_model_version(target, second)
    record = merged[1].record
    assert mv.status == "READY"
    assert mv.tags["nufilt.store_version"] == "2"
    assert mv.tags["nufilt.step"] == str(record.step) == "2"
    assert mv.tags["nufilt.method"] == record.method
    assert mv.tags["nufilt.base_sha256"] == record.base.sha256
    assert mv.tags["nufilt.model_sha256"] == record.model_sha256
    assert mv.tags["nufilt.checkpoints_sha256"].split(",") == [c.sha256 for c in record.checkpoints]
    assert mv.tags["nufilt.checkpoint_sha256"] == record.checkpoints[-1].sha256
    assert all(isinstance(v, str) and len(v) <= 5000 for v in mv.tags.values())

    # the registered artifacts are the store version's folder: weights and lineage record
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(target, second), dst_path=str(tmp_path / "dl"),
        tracking_uri=server.url))
    assert (local / LINEAGE_NAME).is_file()
    assert same(load(local), load(merged[1].output))


def test_retried_publish_does_not_duplicate(server, client, merged, tmp_path):
    target = unique("retried")
    settings = settings_for(server, target_model=target)
    publisher = MlflowPublisher(settings)
    v1 = publisher.publish(merged[0].output, 1, merged[0].record)
    assert publisher.publish(merged[0].output, 1, merged[0].record) == v1  # plain retry
    assert versions_of(client, target) == [v1]

    # a publish that crashed after registering version 2 but before moving the aliases
    run = client.create_run(client.get_experiment_by_name("nufilt").experiment_id)
    client.log_artifacts(run.info.run_id, str(merged[1].output), "merged")
    client.set_terminated(run.info.run_id)
    orphan = client.create_model_version(target, f"runs:/{run.info.run_id}/merged", run.info.run_id,
                                         tags=lineage_tags(merged[1].record, 2), await_creation_for=0)
    assert aliases(client, target) == {"production": v1}

    assert MlflowPublisher(settings).publish(merged[1].output, 2, merged[1].record) == orphan.version
    assert versions_of(client, target) == [v1, orphan.version]
    assert aliases(client, target) == {"production": orphan.version, "previous": v1}
    assert publisher.registry_version_for(2) == orphan.version
    assert publisher.registry_version_for(3) is None


def test_set_production_rolls_back_and_moves_previous(server, client, merged):
    target = unique("rollback")
    publisher = MlflowPublisher(settings_for(server, target_model=target))
    published = [publisher.publish(r.output, n, r.record) for n, r in enumerate(merged, start=1)]
    assert aliases(client, target) == {"production": published[2], "previous": published[1]}

    publisher.set_production(published[1])
    assert aliases(client, target) == {"production": published[1], "previous": published[0]}
    publisher.set_production(published[0])
    assert aliases(client, target) == {"production": published[0]}  # nothing before the first

    # the next promotion after a rollback: previous is what production was
    publisher.set_production(published[2])
    assert aliases(client, target) == {"production": published[2], "previous": published[1]}


def test_publisher_errors_name_the_problem(server, merged, tmp_path):
    publisher = MlflowPublisher(settings_for(server, target_model=unique("errors")))
    with pytest.raises(Exception, match="not a folder"):
        publisher.publish(tmp_path / "missing", 1, merged[0].record)
    with pytest.raises(ValueError, match="target_model"):
        MlflowPublisher(MlflowSettings(tracking_uri=server.url))
