"""Settings and the `tuneserve` command, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.config import Settings, SettingsError, load_settings
from tests.datasets.samples import valid_chat_file


def run_cli(*args, env_extra: dict | None = None, data_dir=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    if data_dir is not None:
        env["TUNESERVE_DATA_DIR"] = str(data_dir)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_defaults(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url_resolved == f"sqlite:///{tmp_path.resolve() / 'tuneserve.db'}"
    assert settings.broker_url_resolved.startswith("sqla+sqlite:///")
    assert settings.port == 8000 and settings.max_upload_bytes == 512 * 1024 * 1024


@pytest.mark.parametrize(
    "name,value",
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_UPLOAD_BYTES", "-1"),
        ("INFERENCE", "maybe"),
        ("BASE_MODELS", "{"),
        ("TRAIN_DEVICES", "0"),
    ],
)
def test_invalid_setting_is_one_line_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(f"TUNESERVE_{name}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"TUNESERVE_{name}" in message and "\n" not in message


def test_heartbeat_must_fit_in_the_lease(monkeypatch):
    monkeypatch.setenv("TUNESERVE_JOB_LEASE_SECONDS", "10")
    monkeypatch.setenv("TUNESERVE_JOB_HEARTBEAT_SECONDS", "6")
    with pytest.raises(SettingsError, match="TUNESERVE_JOB_HEARTBEAT_SECONDS"):
        load_settings()


def test_cli_reports_invalid_setting_and_exits_2(tmp_path):
    result = run_cli("migrate", data_dir=tmp_path, env_extra={"TUNESERVE_PORT": "x"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "TUNESERVE_PORT" in result.stderr


def test_an_inference_replica_needs_the_internal_token(tmp_path):
    result = run_cli("inference", data_dir=tmp_path)
    assert result.returncode == 2 and "TUNESERVE_INTERNAL_TOKEN" in result.stderr


def test_a_worker_needs_at_least_one_device(tmp_path):
    result = run_cli("worker", "--devices", "0", data_dir=tmp_path)
    assert result.returncode == 2 and "--devices: must be at least 1, got 0" in result.stderr


def test_keys_create_list_revoke(tmp_path):
    assert run_cli("migrate", data_dir=tmp_path).returncode == 0
    created = run_cli("keys", "create", "--project", "team-a", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("ts-") and " " not in key

    listed = run_cli("keys", "list", data_dir=tmp_path)
    assert key[:12] in listed.stdout and "team-a" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout

    revoked = run_cli("keys", "revoke", key[:12], data_dir=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in run_cli("keys", "list", data_dir=tmp_path).stdout
    assert run_cli("keys", "revoke", key[:12], data_dir=tmp_path).returncode == 1


def test_validate_command(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(valid_chat_file(12))
    result = run_cli("validate", str(good))
    assert result.returncode == 0 and "OK: 12 chat examples" in result.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(valid_chat_file(10) + b"[]\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 1
    assert "data_type: 1 (line 11)" in result.stdout
