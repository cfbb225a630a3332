"""Daemon settings: a TOML file (`--config FILE`) and `NUFILT_*` environment variables.

Precedence, highest first: environment (`NUFILT_BASE_MODEL`, `NUFILT_FOLDER__SETTLE_SECONDS`,
nested with `__`), then the TOML file, then the defaults below. Unknown keys, in the file or as
`NUFILT_*` variables, are errors, so a typo never silently falls back to a default. Secrets are
`SecretStr`: they print as `**********` in logs and `model_dump`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from nufilt_core.errors import NufiltError, SettingsError
from nufilt_core.matrix_pool import Executor
from nufilt_core.methods import get_method, resolve_settings
from nufilt_core.plausibility import DEFAULT_MAX_RELATIVE_DISTANCE

from .mlflow_connection import redact

ENV_PREFIX = "NUFILT_"
CONFIG_ENV = "NUFILT_CONFIG"  # path of the TOML file, when --config is not given
NESTED_DELIMITER = "__"


class ConfigError(NufiltError):
    """The daemon's configuration is invalid (unknown key, wrong type, missing file)."""

    exit_code = 78  # EX_CONFIG: the systemd unit does not restart on it (RestartPreventExitStatus)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderSettings(_Section):
    enabled: bool = True
    polling: bool = Field(default=False, description="PollingObserver instead of inotify (NFS/CIFS deliver no events)")
    poll_interval_seconds: float = Field(default=1.0, gt=0, description="how often the PollingObserver looks")
    rescan_interval_seconds: float = Field(default=30.0, gt=0, description="full rescan that catches missed events")
    settle_seconds: float = Field(default=2.0, ge=0, description="sizes and mtimes unchanged this long before queueing")
    incomplete_timeout_seconds: float = Field(
        default=600.0, gt=0, description="an entry that stays unreadable this long is queued anyway, to be rejected")
    after: Literal["move", "delete"] = Field(
        default="move", description="once journaled, move the inbox entry to WATCH_DIR/.processed/ or delete it")
    retry_seconds: float = Field(
        default=0.5, gt=0, description="first wait before an entry whose intake failed is tried again, doubling "
        "per failure (at most 300 s); journaled rejected after 5 failures")


class Threshold(_Section):
    """Bounds on one metric: absolute (`min`, `max`), and relative to production (`min_delta`, `max_delta`: the
    candidate's value minus the production version's recorded one, e.g. `min_delta = -0.01`: at most 0.01 worse)."""

    min: float | None = None
    max: float | None = None
    min_delta: float | None = None
    max_delta: float | None = None


class GateSettings(_Section):
    scores: bool = Field(default=True, description="compute the stability/plasticity surrogates (Eq. 13-14)")
    null_rank: int | None = Field(default=None, ge=1, description="r_p for the scores; default: the method's, else 128")
    task_rank: int | None = Field(default=None, ge=1, description="r_v for the scores; default: the method's, else 8")
    check_untouched: bool = Field(default=True, description="tensors the method leaves alone must be bit-identical")
    max_relative_distance: float = Field(
        default=DEFAULT_MAX_RELATIVE_DISTANCE, ge=0, description="reject a checkpoint whose median "
        "‖θ_t − θ0‖/‖θ0‖ over its weight matrices exceeds this (not fine-tuned from this base); 0: off")
    model_folder: bool = Field(
        default=True, description="the candidate must be a folder the Hugging Face libraries load: every file of "
        "the base's folder, config.json of the base's model_type, ...")
    base_model_name: str | None = Field(
        default=None, description="the name PEFT adapters give this base in base_model_name_or_path (e.g. "
        "'sentence-transformers/all-MiniLM-L6-v2'); unset: the base_model path or its folder's name")
    declared_base: Literal["warn", "reject", "ignore"] = Field(
        default="warn", description="an adapter whose base_model_name_or_path is not base_model_name: log a warning, "
        "reject it, or say nothing")
    command: list[str] | None = Field(
        default=None, description="argv of a validation command; gets the candidate folder as last argument (and "
        "NUFILT_CANDIDATE), prints a JSON object of numeric metrics")
    command_timeout_seconds: float = Field(default=3600.0, gt=0)
    thresholds: dict[str, Threshold] = Field(
        default_factory=dict, description="metric name → {min, max, min_delta, max_delta}; the deltas compare with "
        "the production version's recorded value (none at a lineage's first step, or where production has not "
        "recorded the metric: then the delta is not checked, and the report says so); a missing metric rejects")


class MlflowSettings(_Section):
    tracking_uri: str | None = None  # None: MLflow off
    source_model: str | None = None  # registered model to watch for new versions
    target_model: str | None = None  # registered model to publish promoted merges to
    poll_interval_seconds: float = 30.0
    production_alias: str = "production"
    previous_alias: str = "previous"
    webhook_host: str = "127.0.0.1"
    webhook_port: int | None = None  # None: no webhook listener
    webhook_secret: SecretStr | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="forbid", validate_default=True)
    toml_file: ClassVar[Path | None] = None  # set by load_settings; read in settings_customise_sources

    # optional here so `nufilt status` works without it; the daemon refuses to start without one
    base_model: Path | None = Field(
        default=None, description="the pre-trained model θ0 every checkpoint was tuned from")
    watch_dir: Path = Field(default=Path("nufilt-inbox"), description="inbox the folder source watches")
    store_dir: Path = Field(default=Path("nufilt-store"), description="versions/, production symlink, quarantine/")
    state_dir: Path = Field(default=Path("nufilt-state"), description="journal.db, staged copies, downloads")
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(
        default=9180, ge=0, le=65535, description="0: any free port (see STATE/daemon.json)")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:N; with executor ray "
                        "the tasks': cpu (auto) or cuda (a GPU per task)")
    threads: int | None = Field(default=None, ge=1, description="CPU threads of a merge (default: the cores the "
                                "daemon may use): NUFILT merges that many matrices at once, one thread each; on a "
                                "shared host, the cores really free")
    executor: Executor = Field(
        default="local", description="where a merge's matrices are merged: local (the daemon host's cores, `threads`) "
        "or ray (Ray tasks on the cluster at ray_address; nufilt only; needs nufilt[ray]); the same bytes either way")
    ray_address: str | None = Field(
        default=None, description="HOST:PORT of the Ray head (or ray://HOST:PORT); unset: RAY_ADDRESS, else a Ray "
        "instance started on this host for each merge. An unreachable head stops the daemon at start (exit 78)")
    method: str = "nufilt"
    method_settings: dict[str, Any] | None = Field(
        default=None, description="passed to the method at every step, e.g. {profile = \"paper\", null_rank = 64}; "
        "unknown keys are rejected by the method. Unset: a new lineage starts with the method's defaults (nufilt: "
        "profile plus-iso) and every later step inherits the lineage's recorded settings, so an upgrade that "
        "changes a default never changes a running lineage")
    seed: int = 0
    max_shard_bytes: int | None = Field(
        default=None, gt=0, description="shard size of written versions (default: as the base, its largest shard "
        "when it is sharded, else one file up to 5 GiB)")
    keep_versions: int = Field(default=5, ge=2, description="versions kept; production and its parent always are")
    keep_quarantine: int = Field(default=10, ge=0, description="rejected candidates kept")
    max_attempts: int = Field(default=3, ge=1, description="merge processes of one job that may end abnormally (killed "
                              "by a signal, e.g. the OOM killer, or exiting without a result) before it fails; "
                              "daemon crashes and restarts never count")
    interrupted_retry_seconds: float = Field(
        default=5.0, ge=0, description="back-off before a job interrupted by a daemon stop or crash starts again; "
        "doubles with each interruption of the same job, at most 300 s")
    merge_timeout_seconds: float | None = Field(default=None, gt=0)
    prestart_merge_process: bool = Field(
        default=True, description="start the next job's merge process while idle, so its interpreter start and imports "
        "(about a second, ~0.3 GB of memory while it waits) are off the next step's path")
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="on SIGTERM, wait this long for a running merge before abandoning it")
    loop_interval_seconds: float = Field(default=1.0, gt=0, description="supervisor tick: health, gauges, watchdog")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    folder: FolderSettings = FolderSettings()
    gate: GateSettings = GateSettings()
    mlflow: MlflowSettings = MlflowSettings()

    # the method and its settings are checked when the settings load, so a typo stops the daemon at
    # start (exit 78) instead of failing every checkpoint that arrives
    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        try:
            get_method(method)
        except SettingsError as e:
            raise ValueError(str(e)) from None
        return method

    @field_validator("method_settings")
    @classmethod
    def _valid_method_settings(cls, options: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if options is not None and "method" in info.data:  # else unset, or the method itself was invalid
            try:
                resolve_settings(get_method(info.data["method"]), {}, options)
            except SettingsError as e:
                raise ValueError(str(e)) from None
        return options

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.executor == "ray" and not get_method(self.method).parallel_safe:
            raise ValueError(f"executor ray merges with a parallel-safe method (nufilt), not {self.method}")
        if self.executor == "ray" and self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} with executor ray: use cpu or cuda (a GPU per task, assigned by "
                             "the cluster); auto means cpu there")
        m = self.mlflow
        if m.tracking_uri and not (m.source_model or m.target_model):
            raise ValueError("mlflow.tracking_uri is set but neither mlflow.source_model nor mlflow.target_model")
        if m.webhook_port is not None and not m.tracking_uri:
            raise ValueError("mlflow.webhook_port needs mlflow.tracking_uri")
        # the folder source moves what it finds aside, the store prunes what it does not know: one inside another
        # would move the production link away or prune the inbox
        folders = {"watch_dir": self.watch_dir, "store_dir": self.store_dir, "state_dir": self.state_dir}
        resolved = {k: Path(os.path.abspath(v)) for k, v in folders.items()}
        for a, pa in resolved.items():
            for b, pb in resolved.items():
                if a != b and (pa == pb or pb in pa.parents):
                    where = "is" if pa == pb else "is inside"
                    raise ValueError(f"{a} ({folders[a]}) {where} {b} ({folders[b]}): the inbox, the store and "
                                     "the state must be separate folders")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)

    def step_options(self) -> dict[str, Any]:
        """The explicit settings every merge step passes to the method: the rest a step inherits from the
        lineage, or, at a lineage's first step, takes from the method's defaults."""
        return dict(self.method_settings or {})

    def redacted(self) -> dict[str, Any]:
        """For logs and `daemon --check`: JSON-safe, secrets masked (the webhook secret, and a password in the
        tracking URI: `https://user:password@host` shows as `https://***@host`)."""
        data = self.model_dump(mode="json")
        if data["mlflow"]["tracking_uri"]:
            data["mlflow"]["tracking_uri"] = redact(data["mlflow"]["tracking_uri"])
        return data


def unknown_env_keys(environ: dict[str, str] | None = None) -> list[str]:
    """`NUFILT_*` variables that name no setting (pydantic-settings ignores those at the top level)."""
    environ = dict(os.environ) if environ is None else environ
    known = set(Settings.model_fields)
    bad = []
    for key in environ:
        if not key.upper().startswith(ENV_PREFIX) or key.upper() == CONFIG_ENV:
            continue
        field = key[len(ENV_PREFIX):].lower().split(NESTED_DELIMITER)[0]
        if field not in known:
            bad.append(key)
    return sorted(bad)


def format_validation_error(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif err["type"] == "missing":
            env = ENV_PREFIX + NESTED_DELIMITER.join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {loc}: required (set it in the file or as {env})")
        else:
            lines.append(f"  {loc}: {err['msg']}")
    return f"invalid configuration ({origin}):\n" + "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any; default $NUFILT_CONFIG) and the environment; raise ConfigError
    naming every problem."""
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    origin = f"{config_file} and NUFILT_* environment" if config_file else "NUFILT_* environment"
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"{config_file}: config file not found")
    bad_env = unknown_env_keys()
    if bad_env:
        raise ConfigError(f"invalid configuration ({origin}):\n" + "\n".join(
            f"  {k}: unknown environment variable (no such setting)" for k in bad_env))
    # a subclass per call, so concurrent loads (tests) never share the class attribute
    cls = type("Settings", (Settings,), {"toml_file": Path(config_file) if config_file else None})
    try:
        return cls(**overrides)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
    except (OSError, ValueError) as e:  # unreadable or malformed TOML
        raise ConfigError(f"{config_file}: {e}") from None
