"""The submitter's pure parts: ids, run membership, address resolution, runtime env assembly, secret masking."""

from __future__ import annotations

import datetime as dt
import json
import socket
from types import SimpleNamespace

import pytest

from jobs.submit import (
    DEFAULT_ADDRESS, EXIT_UNREACHABLE, EXIT_USAGE, METADATA_KEY, RuntimeEnvSpec, SubmitError,
    attempt_of, attempts_of, build_runtime_env, dated_run_name, main, mask_secrets, render_entrypoint,
    resolve_address, submission_id, validate_run_name,
)


def job(sid: str, status: str, run: str | None = None):
    return SimpleNamespace(submission_id=sid, status=SimpleNamespace(value=status), message="",
                           start_time=1, end_time=None, metadata={METADATA_KEY: run} if run else {})


def test_submission_ids_round_trip() -> None:
    assert [submission_id("pt", n) for n in range(3)] == ["pt", "pt-r1", "pt-r2"]
    assert [attempt_of("pt", s) for s in ("pt", "pt-r1", "pt-r12", "pt-r0", "pt-r01", "pt-rx", "ptx", "pt-r")] == [
        0, 1, 12, None, None, None, None, None]


def test_attempts_of_uses_metadata_to_separate_lookalike_runs() -> None:
    jobs = [job("x-r1", "SUCCEEDED", run="x-r1"), job("x", "FAILED", run="x"), job("x-r2", "RUNNING", run="x"),
            job("x-r1-r1", "PENDING", run="x-r1"), job("y", "RUNNING")]
    assert [(a.submission_id, a.status) for a in attempts_of("x", jobs)] == [("x", "FAILED"), ("x-r2", "RUNNING")]
    assert [a.attempt for a in attempts_of("x-r1", jobs)] == [0, 1]
    # A plain `ray job submit --submission-id y` (no metadata) still counts as attempt 0 of run y.
    assert [a.submission_id for a in attempts_of("y", jobs)] == ["y"]


@pytest.mark.parametrize("name", ["pretrain-base", "preprocess.cc3m_v2", "a"])
def test_valid_run_names(name: str) -> None:
    assert validate_run_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "has space", "semi;colon", "x" * 101, "ünï"])
def test_invalid_run_names(name: str) -> None:
    with pytest.raises(SubmitError, match="invalid run name"):
        validate_run_name(name)


def test_dated_run_names() -> None:
    assert dated_run_name("preprocess-cc3m", None) == "preprocess-cc3m"
    assert dated_run_name("preprocess-cc3m", "20260812") == "preprocess-cc3m-20260812"
    assert dated_run_name("preprocess-cc3m", "2026-08-12") == "preprocess-cc3m-20260812"
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    assert dated_run_name("p", "today") in {f"p-{today}", f"p-{dt.datetime.now(dt.timezone.utc):%Y%m%d}"}
    with pytest.raises(SubmitError, match="expected YYYYMMDD"):
        dated_run_name("p", "2026-13-40")


def test_address_precedence(monkeypatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("https://cli:443") == "https://cli:443"
    with pytest.raises(SubmitError, match="dashboard HTTP address"):
        resolve_address("ray://head:10001")


def test_runtime_env_excludes_forwarding_and_credentials(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = build_runtime_env(RuntimeEnvSpec(file="pretrain"), run="pt")
    assert {".venv", "outputs", ".s3", "bench/.cache", ".git"} <= set(env["excludes"])
    assert env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:8333"
    assert env["env_vars"]["RAY_AUTH_MODE"] == "disabled"
    assert env["env_vars"]["MPLUG2_RUN_NAME"] == "pt"
    assert env["env_vars"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # from jobs/runtime_env/pretrain.yaml
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]  # not forwarded unless asked
    assert env["config"]["setup_timeout_seconds"] == 1200
    # --forward-credentials forwards a 0600 credentials file by path, never the values (Ray logs runtime envs)
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDLOCAL\naws_secret_access_key = supersecretvalue\n")
    creds.chmod(0o600)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with_creds = build_runtime_env(RuntimeEnvSpec(forward_credentials=True), run="pt")
    assert with_creds["env_vars"]["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)
    assert "supersecretvalue" not in json.dumps(with_creds) and "AKIDLOCAL" not in json.dumps(with_creds)
    with_creds["env_vars"].update(AWS_ACCESS_KEY_ID="AKIDLOCAL", AWS_SECRET_ACCESS_KEY="supersecretvalue")
    masked = json.dumps(mask_secrets(with_creds))
    assert "supersecretvalue" not in masked and "AKIDLOCAL" not in masked and "127.0.0.1:8333" in masked
    assert mask_secrets({"TOKENIZERS_PARALLELISM": "false", "GITHUB_TOKEN": "x", "db_password": "y"}) == {
        "TOKENIZERS_PARALLELISM": "false", "GITHUB_TOKEN": "***", "db_password": "***"}


def test_runtime_env_file_with_credentials_is_refused(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n")
    with pytest.raises(SubmitError, match="looks like a credential"):
        build_runtime_env(RuntimeEnvSpec(file=str(bad)), run="r")
    with pytest.raises(SubmitError, match="not found"):
        build_runtime_env(RuntimeEnvSpec(file="no-such-preset"), run="r")


def test_entrypoint_rendering() -> None:
    assert render_entrypoint(["python", "-m", "jobs.pretrain", "--run-name", "{run_name}", "a b"], "pt-1") == (
        "python -m jobs.pretrain --run-name pt-1 'a b'")
    with pytest.raises(SubmitError, match="no entrypoint"):
        render_entrypoint([], "r")


def test_dry_run_prints_masked_submission(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_secret_access_key = supersecretvalue\n")
    creds.chmod(0o600)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    code = main(["submit", "--run-name", "preprocess-cc3m", "--date-id", "20260812", "--runtime-env", "preprocess",
                 "--forward-credentials", "--dry-run", "--", "python", "-m", "jobs.preprocess", "--run-name",
                 "{run_name}"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["run"] == "preprocess-cc3m-20260812"
    assert data["entrypoint"] == "python -m jobs.preprocess --run-name preprocess-cc3m-20260812"
    assert "AWS_SECRET_ACCESS_KEY" not in data["runtime_env"]["env_vars"]       # values are never forwarded
    assert "supersecretvalue" not in out


def test_unreachable_server_exit_code(capsys) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    assert main(["status", "any", "--address", f"http://127.0.0.1:{port}"]) == EXIT_UNREACHABLE
    assert "no Ray job server at" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys) -> None:
    assert main(["submit", "--run-name", "bad name", "--dry-run", "--", "true"]) == EXIT_USAGE
    assert "invalid run name" in capsys.readouterr().err
    assert main(["submit", "--run-name", "ok", "--env", "NOEQUALS", "--dry-run", "--", "true"]) == EXIT_USAGE
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0

