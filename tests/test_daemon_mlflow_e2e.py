"""End to end with MLflow: the real `nufilt daemon` subprocess, configured only through
NUFILT_MLFLOW__* variables, against a real `mlflow server` (SQLite, loopback, free port).

Versions registered in the source model become store versions in order and are published to the
target model with aliases `production`/`previous` and lineage tags; `nufilt rollback` moves the
alias back; with the server stopped a merge is still promoted locally, the error shows on
/metrics, and the version is published once the server is back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, wait_for
from mlflow_server import MlflowServer
from models import base_state, finetune, write_model
from nufilt_daemon.intake import content_hash
from nufilt_daemon.mlflow_connection import registry_client
from peft_models import lora_adapter, tiny_bert
from test_mlflow_registry import register, register_folder, unique

from nufilt_core.lineage import LineageRecord

pytestmark = pytest.mark.slow

PUBLISH_ERRORS = "nufilt_registry_errors_total", (("operation", "publish"),)
REGISTRY_PENDING = "nufilt_registry_pending_publications", ()


class MlflowDaemon(DaemonProcess):
    """The harness's daemon, with the MLflow settings in its environment (also for `nufilt rollback`,
    which must know a registry is configured to queue the alias move)."""

    def __init__(self, root: Path, base: Path, mlflow_env: dict[str, str]):
        super().__init__(root, base)
        self.mlflow_env = mlflow_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.mlflow_env}

    def cli_without_mlflow_env(self, *args: str) -> str:
        """`nufilt ARGS --config FILE` from an operator's shell: the MLflow settings were given to
        the daemon only (systemd Environment=, the quickstart's exports), not to this command."""
        saved, self.mlflow_env = self.mlflow_env, {}
        try:
            return self.cli(*args).stdout
        finally:
            self.mlflow_env = saved


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: MlflowServer) -> Any:
    return registry_client(server.url)


def daemon(root: Path, base: Path, server: MlflowServer, source: str, target: str) -> MlflowDaemon:
    return MlflowDaemon(root, base, {
        "NUFILT_MLFLOW__TRACKING_URI": server.url,
        "NUFILT_MLFLOW__SOURCE_MODEL": source,
        "NUFILT_MLFLOW__TARGET_MODEL": target,
        "NUFILT_MLFLOW__POLL_INTERVAL_SECONDS": "0.5",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # an unreachable server fails at once; the daemon retries
    })


def by_store_version(client: Any, target: str) -> dict[int, Any]:
    """The target's registry versions, keyed by the store version they were published from."""
    versions = client.search_model_versions(f"name='{target}'")
    return {int(mv.tags["nufilt.store_version"]): mv for mv in versions}


def aliases_by_store_version(client: Any, target: str) -> dict[str, int]:
    """alias → store version of the registry version it points to."""
    try:
        aliases = client.get_registered_model(target).aliases
    except Exception:  # not created yet
        return {}
    published = {mv.version: n for n, mv in by_store_version(client, target).items()}
    return {alias: published[version] for alias, version in aliases.items()}


def test_registered_versions_are_merged_in_order_published_and_rolled_back(server, client, tmp_path):
    base = base_state()
    base_dir = write_model(base, tmp_path / "base")
    source, target = unique("finetuned"), unique("merged")
    states = [finetune(base, i) for i in (1, 2, 3)]
    hashes = [content_hash(write_model(s, tmp_path / f"t{i}")) for i, s in enumerate(states, start=1)]
    register(client, source, states[0], tmp_path)
    register(client, source, states[1], tmp_path)
    d = daemon(tmp_path / "svc", base_dir, server, source, target).start()
    try:
        register(client, source, states[2], tmp_path)  # while the daemon polls
        wait_for("three promotions", lambda: len(d.in_states("promoted")) == 3, timeout=150)
        jobs = d.jobs()
        assert [(j["source"], j["reference"], j["version"], j["step"]) for j in jobs] == [
            ("mlflow", f"models:/{source}/{n}", n, n) for n in (1, 2, 3)]
        assert [j["sha256"] for j in jobs] == hashes  # the registered weights, downloaded intact
        assert os.readlink(d.store / "production") == "versions/v000003"
        assert [c.sha256 for c in LineageRecord.read(d.store / "production").checkpoints] == hashes

        wait_for("production and previous aliases on store versions 3 and 2",
                 lambda: aliases_by_store_version(client, target) == {"production": 3, "previous": 2}, timeout=90)
        published = by_store_version(client, target)
        assert sorted(published) == [1, 2, 3]
        for n, mv in published.items():
            record = LineageRecord.read(d.store / "versions" / f"v{n:06d}")
            assert mv.status == "READY"
            assert mv.tags["nufilt.step"] == str(n)
            assert mv.tags["nufilt.model_sha256"] == record.model_sha256
            assert mv.tags["nufilt.checkpoints_sha256"].split(",") == hashes[:n]
            assert mv.tags["nufilt.base_sha256"] == record.base.sha256 == content_hash(base_dir)
        m = wait_for("metrics settled", lambda: (lambda m: m[REGISTRY_PENDING] == 0 and m)(d.metrics()), timeout=15)
        assert m[("nufilt_checkpoints_detected_total", (("source", "mlflow"),))] == 3
        assert m[("nufilt_production_version", ())] == 3
        assert m[PUBLISH_ERRORS] == 0

        out = d.cli("rollback", "--reason", "task 3 regressed").stdout
        assert "v000003 → v000002" in out and "MLflow alias follows" in out
        assert os.readlink(d.store / "production") == "versions/v000002"
        wait_for("production alias back on store version 2",
                 lambda: aliases_by_store_version(client, target) == {"production": 2, "previous": 1}, timeout=60)
        # the same from a shell that does not know about MLflow: the alias must follow all the same
        assert "v000002 → v000001" in d.cli_without_mlflow_env("rollback")
        wait_for("production alias back on store version 1",
                 lambda: aliases_by_store_version(client, target) == {"production": 1}, timeout=60)
        assert sorted(by_store_version(client, target)) == [1, 2, 3]  # moved, nothing re-published
    finally:
        assert d.stop() == 0


def test_a_registered_peft_adapter_is_merged_into_a_complete_model_folder(server, client, tmp_path):
    """A version whose artifacts hold a PEFT adapter where mlflow.transformers puts one (model/peft/), beside
    other files: the adapter is the checkpoint, and the version promoted is a model folder with the base's config."""
    base = tiny_bert(tmp_path / "base")
    logged = tmp_path / "logged"
    lora_adapter(base, logged / "peft", r=2, lora_alpha=4, target_modules=["query", "value"])
    (logged / "MLmodel").write_text("flavors: {}\n")
    source = unique("finetuned")
    register_folder(client, source, logged, "model")
    d = daemon(tmp_path / "svc", base, server, source, unique("merged")).start()
    try:
        wait_for("the adapter merged", lambda: d.in_states("promoted", "rejected", "failed"), timeout=120)
        assert [j["state"] for j in d.jobs()] == ["promoted"], d.jobs()
        assert d.jobs()[0]["sha256"] == content_hash(logged / "peft")
        production = d.store / "production"
        assert (production / "config.json").read_bytes() == (base / "config.json").read_bytes()
        assert not (production / "adapter_config.json").exists()
        assert LineageRecord.read(production).checkpoints[0].declared_base == str(base)
    finally:
        assert d.stop() == 0


def test_a_version_whose_artifacts_are_gone_is_rejected_and_later_versions_merge(server, client, tmp_path):
    """The registry answers, but one version's artifacts were deleted: after a few tries it is journaled as
    rejected with the registry's answer, and the versions behind it are merged instead of waiting for ever."""
    base = base_state()
    base_dir = write_model(base, tmp_path / "base")
    source = unique("finetuned")
    versions = [register(client, source, finetune(base, i), tmp_path) for i in (1, 2, 3)]
    run_id = client.get_model_version(source, versions[1]).run_id
    gone = next(p for p in server.artifacts.rglob(run_id) if p.is_dir())
    shutil.rmtree(gone)
    d = daemon(tmp_path / "svc", base_dir, server, source, unique("merged")).start()
    try:
        wait_for("all three journaled", lambda: len(d.in_states("promoted", "rejected")) == 3, timeout=180)
        jobs = d.jobs()
        assert [(j["reference"], j["state"]) for j in jobs] == [
            (f"models:/{source}/1", "promoted"), (f"models:/{source}/2", "rejected"),
            (f"models:/{source}/3", "promoted")], jobs
        assert "RESOURCE_DOES_NOT_EXIST" in jobs[1]["reason"] and "3 tries" in jobs[1]["reason"]
        assert d.logged("mlflow_version_rejected")
    finally:
        assert d.stop() == 0


def test_mlflow_down_the_merge_is_promoted_locally_and_published_when_it_is_back(server, client, tmp_path):
    base = base_state()
    base_dir = write_model(base, tmp_path / "base")
    checkpoint = write_model(finetune(base, 4), tmp_path / "t4")
    target = unique("merged")
    d = daemon(tmp_path / "svc", base_dir, server, unique("finetuned"), target).start()
    try:
        server.stop()
        # `submit --wait` returns with the promotion, and says once that the registry fails (not waiting on it)
        out = d.cli("submit", str(checkpoint), "--name", "task4", "--wait", "--timeout", "120").stdout
        assert "promoted as v000001 (step 1)" in out and "not published to the model registry yet" in out, out
        assert os.readlink(d.store / "production") == "versions/v000001"
        m = wait_for("a publish error on /metrics", lambda: (lambda m: m[PUBLISH_ERRORS] >= 1 and m)(d.metrics()),
                     timeout=60)
        assert m[REGISTRY_PENDING] == 1 and m[("nufilt_production_version", ())] == 1
        assert d.logged("registry_error")

        server.start()
        wait_for("store version 1 published as production after the outage",
                 lambda: aliases_by_store_version(client, target) == {"production": 1}, timeout=120)
        mv = by_store_version(client, target)[1]
        assert mv.tags["nufilt.checkpoint_sha256"] == content_hash(checkpoint)
        assert mv.tags["nufilt.model_sha256"] == LineageRecord.read(d.store / "production").model_sha256
        wait_for("nothing left to publish", lambda: d.metrics()[REGISTRY_PENDING] == 0, timeout=15)
    finally:
        server.start()  # whatever happened, leave the server up for the other tests
        assert d.stop() == 0
