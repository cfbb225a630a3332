"""Daemon settings: TOML file, NUFILT_* environment (nested with __), unknown keys, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from nufilt_daemon.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("NUFILT_"):
            monkeypatch.delenv(k)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "nufilt.toml"
    p.write_text(text)
    return p


def test_file_then_environment_with_nesting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = write(tmp_path, 'base_model = "/models/base"\nmethod_settings = {null_rank = 64}\n'
                          '[folder]\nsettle_seconds = 5\n[gate]\nthresholds = {accuracy = {min = 0.8}}\n')
    s = load_settings(cfg)
    assert s.base_model == Path("/models/base") and s.folder.settle_seconds == 5
    assert s.method_settings == {"null_rank": 64} and s.gate.thresholds["accuracy"].min == 0.8
    assert s.metrics_host == "127.0.0.1" and s.mlflow.tracking_uri is None  # defaults: local, MLflow off

    monkeypatch.setenv("NUFILT_FOLDER__SETTLE_SECONDS", "0.5")
    monkeypatch.setenv("NUFILT_METRICS_PORT", "9999")
    monkeypatch.setenv("NUFILT_MLFLOW__TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("NUFILT_MLFLOW__TARGET_MODEL", "merged")
    monkeypatch.setenv("NUFILT_MLFLOW__WEBHOOK_SECRET", "s3cret")
    s = load_settings(cfg)
    assert s.folder.settle_seconds == 0.5 and s.metrics_port == 9999  # the environment wins over the file
    assert s.mlflow.target_model == "merged" and s.mlflow.webhook_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s) and s.redacted()["mlflow"]["webhook_secret"] == "**********"
    monkeypatch.setenv("NUFILT_MLFLOW__TRACKING_URI", "https://trainer:pa55word@mlflow.example:5000")
    shown = load_settings(cfg).redacted()
    assert shown["mlflow"]["tracking_uri"] == "https://***@mlflow.example:5000" and "pa55word" not in str(shown)

    monkeypatch.setenv("NUFILT_CONFIG", str(cfg))  # the file by environment, as a systemd unit may set it
    assert load_settings().base_model == Path("/models/base")


@pytest.mark.parametrize("line", ['watch_dir = "/srv/nufilt/store/inbox"', 'state_dir = "/srv/nufilt/store"',
                                  'watch_dir = "/srv/nufilt/store/../store"'])
def test_the_inbox_the_store_and_the_state_must_be_separate(tmp_path: Path, line: str):
    cfg = write(tmp_path, f'store_dir = "/srv/nufilt/store"\n{line}\n')
    with pytest.raises(ConfigError, match=r"must be separate folders") as e:
        load_settings(cfg)
    assert "store_dir (/srv/nufilt/store)" in str(e.value)


def test_unknown_keys_and_bad_values_are_errors_that_name_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match=r"folder\.settle_secs: unknown key"):
        load_settings(write(tmp_path, "[folder]\nsettle_secs = 1\n"))
    with pytest.raises(ConfigError, match=r"keep_versions: Input should be greater than or equal to 2"):
        load_settings(write(tmp_path, "keep_versions = 1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"nufilt\.toml"):
        load_settings(write(tmp_path, "this is = not toml ["))
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_uri is set but neither"):
        load_settings(write(tmp_path, '[mlflow]\ntracking_uri = "http://x"\n'))
    monkeypatch.setenv("NUFILT_SETTLE_SECONDS", "1")  # forgot the FOLDER__ part
    with pytest.raises(ConfigError, match="NUFILT_SETTLE_SECONDS: unknown environment variable"):
        load_settings()
    monkeypatch.delenv("NUFILT_SETTLE_SECONDS")
    monkeypatch.setenv("NUFILT_FOLDER__SETLE_SECONDS", "1")
    with pytest.raises(ConfigError, match=r"folder\.setle_seconds: unknown key"):
        load_settings()


def test_the_operator_docs_list_every_setting_and_its_variable():
    from nufilt_daemon.config import FolderSettings, GateSettings, MlflowSettings, Settings

    doc = (Path(__file__).parent.parent / "docs" / "daemon.md").read_text()
    keys = [k for k in Settings.model_fields if k not in ("folder", "gate", "mlflow")]
    for prefix, section in (("folder", FolderSettings), ("gate", GateSettings), ("mlflow", MlflowSettings)):
        keys += [f"{prefix}.{k}" for k in section.model_fields]
    missing = [k for k in keys if f"| `{k}` | `NUFILT_{k.upper().replace('.', '__')}`" not in doc]
    assert missing == []


def test_the_method_and_its_settings_are_checked_when_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A typo stops the daemon at start (exit 78) instead of failing every checkpoint that arrives."""
    import subprocess
    import sys

    with pytest.raises(ConfigError, match=r"method: .*unknown method 'nufilz'"):
        load_settings(write(tmp_path, 'method = "nufilz"\n'))
    with pytest.raises(ConfigError, match=r"method_settings: .*preset: Input should be"):
        load_settings(write(tmp_path, 'method_settings = {preset = "bret"}\n'))
    with pytest.raises(ConfigError, match=r"method_settings: .*include: .*not a valid regular expression"):
        load_settings(write(tmp_path, 'method_settings = {include = ["("]}\n'))
    assert load_settings(write(tmp_path, 'method = "ties"\nmethod_settings = {topk = 0.2}\n')).method == "ties"
    monkeypatch.setenv("NUFILT_BASE_MODEL", str(tmp_path / "base"))
    monkeypatch.setenv("NUFILT_METHOD_SETTINGS", '{"null_rnak": 64}')
    proc = subprocess.run([str(Path(sys.executable).parent / "nufilt"), "daemon"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 78 and "null_rnak" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nufilt-state").exists()  # stopped before creating anything


def test_the_preset_choices_are_the_selection_presets():
    from typing import get_args

    from nufilt_core.methods.nufilt import Preset
    from nufilt_core.selection import PRESETS

    assert set(get_args(Preset)) == {"auto", "all-linear", *PRESETS}


def test_a_command_run_where_no_state_is_says_how_to_point_it_at_the_daemon(tmp_path: Path):
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "nufilt")
    proc = subprocess.run([exe, "status"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nufilt-state" / "journal.db") in proc.stderr
    assert "--config FILE or NUFILT_CONFIG" in proc.stderr
    cfg = write(tmp_path, f'state_dir = "{tmp_path / "elsewhere"}"\n')
    proc = subprocess.run([exe, "history", "--config", str(cfg)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and f"state_dir of {cfg}" in proc.stderr
