"""Publish promoted versions to an MLflow registered model, with aliases and lineage tags.

`publish` logs the version folder (weights, lineage record, validation report) as the artifacts
`merged` of a run in experiment "nufilt", registers `runs:/<run>/merged` as a new version of
`target_model` with the lineage as tags, waits until it is READY, then moves `previous` to the
version that held `production` and `production` to the new one.

Every step can be retried after a crash or an MLflow error (the daemon's outbox does that):
- the run is found again by its tags (store version + model sha256) when it finished logging;
- the registry version carries the same tags from its creation (tags are part of the create
  call, so there is no moment where it exists untagged) and is reused instead of duplicated;
- the alias moves look at where `production` points now, so repeating them changes nothing.
The model sha256 is part of the identity so that a new store, whose numbering starts again at 1,
never reuses a version published from an old one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from nufilt_core import __version__ as nufilt_version
from nufilt_core.lineage import LineageRecord

from ..config import MlflowSettings
from ..mlflow_connection import error_code, registry_client
from ..sources.mlflow_registry import quote_filter_value

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = structlog.get_logger("nufilt.publishers.mlflow")

EXPERIMENT_NAME = "nufilt"
ARTIFACT_PATH = "merged"
TAG_PREFIX = "nufilt."
STORE_VERSION_TAG = TAG_PREFIX + "store_version"
MODEL_SHA_TAG = TAG_PREFIX + "model_sha256"
# MLflow allows 100k characters per registry tag value (8k per run tag); other registries less
MAX_TAG_VALUE_CHARS = 5000
READY_TIMEOUT_SECONDS = 300.0


class PublishError(RuntimeError):
    """MLflow refused or failed a publication step (the daemon retries later)."""


def _fit(value: str, limit: int = MAX_TAG_VALUE_CHARS) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _recent_hashes(hashes: list[str], limit: int = MAX_TAG_VALUE_CHARS) -> str:
    """Comma-separated, newest last; drops the oldest when they do not fit (the full list is in
    nufilt-lineage.json among the artifacts)."""
    kept: list[str] = []
    size = 0
    for h in reversed(hashes):
        if size + len(h) + 1 > limit:
            break
        kept.append(h)
        size += len(h) + 1
    return ",".join(reversed(kept))


def lineage_tags(record: LineageRecord, store_version: int) -> dict[str, str]:
    """The tags a published version carries; every value a string within MAX_TAG_VALUE_CHARS."""
    hashes = [c.sha256 for c in record.checkpoints]
    tags = {
        STORE_VERSION_TAG: str(store_version),
        MODEL_SHA_TAG: record.model_sha256,
        TAG_PREFIX + "step": str(record.step),
        TAG_PREFIX + "method": record.method,
        TAG_PREFIX + "seed": str(record.seed),
        TAG_PREFIX + "base_sha256": record.base.sha256,
        TAG_PREFIX + "checkpoint_sha256": hashes[-1] if hashes else "",
        TAG_PREFIX + "checkpoints_sha256": _recent_hashes(hashes),
        TAG_PREFIX + "checkpoints_count": str(len(hashes)),
        TAG_PREFIX + "settings": _fit(json.dumps(record.settings, sort_keys=True, default=str)),
        TAG_PREFIX + "version": nufilt_version,
    }
    return {k: _fit(v) for k, v in tags.items()}


class MlflowPublisher:
    def __init__(self, settings: MlflowSettings, *, experiment_name: str = EXPERIMENT_NAME,
                 ready_timeout_seconds: float = READY_TIMEOUT_SECONDS):
        if not settings.tracking_uri or not settings.target_model:
            raise ValueError("the MLflow publisher needs mlflow.tracking_uri and mlflow.target_model")
        self.settings = settings
        self.target: str = settings.target_model
        self.experiment_name = experiment_name
        self.ready_timeout_seconds = ready_timeout_seconds
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = registry_client(self.settings.tracking_uri or "")
        return self._client

    # --- publish ---------------------------------------------------------------------------

    def publish(self, model_dir: Path, store_version: int, record: LineageRecord) -> str:
        """Register `model_dir` as a new version of the target model and make it production.

        Returns the registry version ("7"). Idempotent per (store_version, model sha256).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise PublishError(f"{model_dir}: not a folder, nothing to publish")
        tags = lineage_tags(record, store_version)
        existing = self._find_version(store_version, record.model_sha256)
        if existing is not None:
            log.info("mlflow_publish_resumed", model=self.target, store_version=store_version,
                     registry_version=existing.version)
            mv = existing
        else:
            self._ensure_registered_model()
            run_id = self._find_run(store_version, record.model_sha256) or self._log_run(model_dir, store_version, tags)
            mv = self.client.create_model_version(
                self.target, f"runs:/{run_id}/{ARTIFACT_PATH}", run_id, tags=tags,
                description=f"nufilt store version {store_version}, step {record.step} ({record.method})",
                await_creation_for=0)
        self._wait_ready(mv)
        self._promote(mv.version)
        log.info("mlflow_published", model=self.target, store_version=store_version, registry_version=mv.version,
                 alias=self.settings.production_alias)
        return str(mv.version)

    def _ensure_registered_model(self) -> None:
        try:
            self.client.create_registered_model(
                self.target, description="Merged by nufilt (NUFILT continual merging); see the nufilt.* tags.")
        except Exception as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except Exception as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":  # created meanwhile by someone else
                raise
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _find_run(self, store_version: int, model_sha256: str) -> str | None:
        """A finished run of an earlier attempt that logged this very model."""
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=(f"tags.`{STORE_VERSION_TAG}` = '{store_version}' AND tags.`{MODEL_SHA_TAG}` = "
                           f"'{model_sha256}' AND tags.`{TAG_PREFIX}target_model` = {quote_filter_value(self.target)}"
                           " AND attributes.status = 'FINISHED'"),
            max_results=1)
        return runs[0].info.run_id if runs else None

    def _log_run(self, model_dir: Path, store_version: int, tags: dict[str, str]) -> str:
        run_tags = {k: _fit(v, 8000) for k, v in tags.items()}
        run_tags[TAG_PREFIX + "target_model"] = self.target
        run = self.client.create_run(self._experiment_id(), tags=run_tags, run_name=f"nufilt-v{store_version:06d}")
        run_id = run.info.run_id
        try:
            self.client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
        except BaseException:
            # a half-logged run must not be found again by _find_run
            try:
                self.client.set_terminated(run_id, "FAILED")
            except Exception:
                pass
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _wait_ready(self, mv: ModelVersion) -> None:
        deadline = time.monotonic() + self.ready_timeout_seconds
        delay = 0.2
        while True:
            if mv.status == "READY":
                return
            if mv.status == "FAILED_REGISTRATION":
                raise PublishError(f"models:/{self.target}/{mv.version}: registration failed: "
                                   f"{mv.status_message or 'no message'}")
            if time.monotonic() > deadline:
                raise PublishError(f"models:/{self.target}/{mv.version}: still {mv.status} after "
                                   f"{self.ready_timeout_seconds:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            mv = self.client.get_model_version(self.target, mv.version)

    # --- aliases ---------------------------------------------------------------------------

    def _aliases(self) -> dict[str, str]:
        return dict(self.client.get_registered_model(self.target).aliases)

    def _promote(self, version: str) -> None:
        production, previous = self.settings.production_alias, self.settings.previous_alias
        current = self._aliases().get(production)
        if current == str(version):
            return  # a retry after the moves already happened
        if current is not None:
            self.client.set_registered_model_alias(self.target, previous, current)
        self.client.set_registered_model_alias(self.target, production, str(version))

    def set_production(self, registry_version: str) -> None:
        """Rollback: `production` → `registry_version`; `previous` → the version published just
        before it in store order, or removed when there is none (so it never points forward)."""
        production, previous = self.settings.production_alias, self.settings.previous_alias
        mv = self.client.get_model_version(self.target, str(registry_version))
        self.client.set_registered_model_alias(self.target, production, str(mv.version))
        before = self._published_before(mv)
        if before is not None:
            self.client.set_registered_model_alias(self.target, previous, before)
        elif previous in self._aliases():
            self.client.delete_registered_model_alias(self.target, previous)
        log.info("mlflow_production_set", model=self.target, registry_version=str(mv.version), previous=before)

    def _published_before(self, mv: ModelVersion) -> str | None:
        store_version = _int_or_none(mv.tags.get(STORE_VERSION_TAG))
        if store_version is None:
            return None
        best: tuple[int, int, str] | None = None
        for other in self._tagged_versions():
            other_store = _int_or_none(other.tags.get(STORE_VERSION_TAG))
            if other_store is None or other_store >= store_version:
                continue
            key = (other_store, int(other.version), str(other.version))  # newest registration wins a tie
            if best is None or key > best:
                best = key
        return best[2] if best else None

    # --- lookups ---------------------------------------------------------------------------

    def registry_version_for(self, store_version: int, model_sha256: str | None = None) -> str | None:
        """The registry version published for a store version (optionally: of exactly this model)."""
        found = self._find_version(store_version, model_sha256)
        return str(found.version) if found is not None else None

    def _find_version(self, store_version: int, model_sha256: str | None) -> ModelVersion | None:
        query = f"name={quote_filter_value(self.target)} AND tags.`{STORE_VERSION_TAG}` = '{store_version}'"
        if model_sha256:
            query += f" AND tags.`{MODEL_SHA_TAG}` = '{model_sha256}'"
        try:
            versions = list(self.client.search_model_versions(query, max_results=100))
        except Exception as e:
            if error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        # several only if an old store published the same number: the newest registration is ours
        return max(versions, key=lambda v: int(v.version)) if versions else None

    def _tagged_versions(self) -> list[ModelVersion]:
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                f"name={quote_filter_value(self.target)}", max_results=100, page_token=token)
            found.extend(mv for mv in page if STORE_VERSION_TAG in mv.tags)
            token = page.token
            if not token:
                return found


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
