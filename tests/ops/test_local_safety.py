"""One-machine safety rules that need no Ray: where relative paths point, the embedded S3's secret, what the
submitter forwards and reports, credential errors, demo size checks."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs.submit import EXIT_UNREACHABLE, RuntimeEnvSpec, SubmitError, build_runtime_env, main as submit_main
from mplug2 import paths
from mplug2.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- paths

def test_relative_paths_resolve_on_the_driver(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(paths.WORKDIR_ENV, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = TrainConfig.from_yaml(paths.config_file("configs/retrieval_tiny.yaml"),
                                {"data.train": "[{name: v, path: corpus/shards}]"}).resolve_paths()
    assert cfg.storage == str(tmp_path / "outputs" / "runs")
    assert cfg.init_from == str(tmp_path / "outputs" / "runs" / "pt-tiny")
    assert cfg.data.train[0].path == str(tmp_path / "corpus" / "shards")
    assert cfg.data.eval.path.startswith("s3://")                      # URLs unchanged
    assert cfg.resolve_paths().to_dict() == cfg.to_dict()              # idempotent
    monkeypatch.setenv(paths.WORKDIR_ENV, "/data/work")
    assert paths.resolve("runs", field="storage") == "/data/work/runs"


def test_relative_output_in_a_ray_job_is_refused_with_the_field(monkeypatch) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv(paths.WORKDIR_ENV, raising=False)
    cfg = TrainConfig(run_name="r", storage="outputs/runs", init_from="shipped/init")
    with pytest.raises(paths.RelativeOutputInJobError, match="storage: 'outputs/runs' is relative"):
        cfg.resolve_paths()
    ok = TrainConfig(run_name="r", storage="s3://b/runs", init_from="shipped/init").resolve_paths()
    assert ok.init_from == os.path.join(os.getcwd(), "shipped/init")     # inputs resolve in the job's folder


def test_placeholder_bucket_names_the_field() -> None:
    cfg = TrainConfig.from_yaml(paths.config_file("configs/pretrain_base.yaml"),
                                {"storage": "s3://real/runs"})
    with pytest.raises(ValueError, match="init_from is the placeholder"):
        cfg.resolve_paths()


def test_shipped_config_is_found_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(paths.config_file("configs/pretrain_tiny.yaml")).read_text().startswith("# Tiny pretraining")
    assert paths.config_file("pretrain_tiny") == paths.config_file("configs/pretrain_tiny.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pretrain_tiny.yaml").write_text("run_name: mine\n")
    assert paths.config_file("configs/pretrain_tiny.yaml") == "configs/pretrain_tiny.yaml"   # the user's wins
    with pytest.raises(FileNotFoundError, match="nor among the shipped configs"):
        paths.config_file("configs/nope.yaml")


def test_rendezvous_finds_the_loopback_interface() -> None:
    from mplug2.train.rendezvous import interface_of

    name = interface_of("127.0.0.1")
    assert name is not None and dict((n, i) for i, n in socket.if_nameindex())[name]   # a real interface
    assert interface_of("203.0.113.7") is None and interface_of("not-an-ip") is None


# --------------------------------------------------------------------------------------- embedded S3

def test_embedded_s3_secret_is_random_per_folder_0600_and_env_names_the_file(tmp_path, monkeypatch) -> None:
    from mplug2.s3server import S3Server, folder_secret, write_credentials

    monkeypatch.delenv("MPLUG2_S3_SECRET", raising=False)
    a, b = folder_secret(tmp_path / "a"), folder_secret(tmp_path / "b")
    assert a != b and len(a) >= 32
    creds = tmp_path / "a" / "credentials"
    creds.parent.mkdir()
    write_credentials(creds, "mplug2", a)
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert folder_secret(tmp_path / "a") == a                       # kept across restarts
    monkeypatch.setenv("MPLUG2_S3_SECRET", "from-the-user")
    assert folder_secret(tmp_path / "a") == "from-the-user"
    env = S3Server(root=tmp_path / "a", port=8333).env()
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)
    assert not any(a in v or "from-the-user" in v for v in env.values())
    # a server in an assertion, a log line or a traceback's locals shows no secret
    assert a not in repr(S3Server(root=tmp_path / "a", secret_key=a))


def test_embedded_s3_leaves_no_socket_in_tmp_after_a_crash_restart_and_stop() -> None:
    """weed's default unix sockets are ``/tmp/seaweedfs-*-<port>.sock``, never removed: one per run piled up."""
    from mplug2.s3server import S3Server

    def ours(srv: S3Server) -> list[str]:
        ports = {srv.port} | {int(a.split("=", 1)[1]) for a in srv._cmd if a.split("=", 1)[0].endswith(".port")}
        ports |= {p + 10000 for p in ports}
        return sorted(p.name for p in Path("/tmp").glob("seaweedfs-*.sock") if int(p.stem.rsplit("-", 1)[1]) in ports)

    # a short data folder of its own: under a long TMPDIR, tmp_path's would leave no room for a unix socket path
    # (the server then keeps weed's /tmp default and removes it on stop, which the last line checks too)
    with tempfile.TemporaryDirectory(prefix="s3sock-", dir="/tmp") as tmp:
        root = Path(tmp) / "s3"
        srv = S3Server(root=root).start()
        try:
            assert list((root / "sock").glob("seaweedfs-s3-*.sock"))    # in the data folder, not /tmp
            srv.kill()                                                               # a crash, then a restart
            srv.start()
        finally:
            srv.stop()
    assert ours(srv) == []


def test_mplug2_s3_stop_never_signals_a_pid_reused_by_another_process(tmp_path, capsys) -> None:
    """``server.json`` keeps the pid of a server that may be long gone (a crash, a reboot); the kernel gives that
    pid to other processes. ``stop`` then says "not running" and signals nothing, ``start`` does not answer
    "already running"; the pid of the live server it names is still recognised and stopped."""
    from mplug2.s3server import S3Server, main as s3_main

    root = tmp_path / "s3"
    srv = S3Server(root=root).start()
    try:
        srv.save_state()
        assert S3Server.from_state(root).pid == srv.pid          # the live server is ours
    finally:
        srv.stop()
    # another process, leader of its own group, now holds the pid server.json names
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             start_new_session=True)
    try:
        state = json.loads((root / "server.json").read_text())
        (root / "server.json").write_text(json.dumps({**state, "pid": other.pid}))
        assert S3Server.from_state(root).pid is None
        assert s3_main(["stop", "--dir", str(root)]) == 0
        assert capsys.readouterr().out.strip() == "not running"
        assert other.poll() is None, "stop signalled a process that is not the server"
    finally:
        other.stdin.close()
        other.wait(timeout=30)


def test_local_ray_temp_dir_keeps_rays_sockets_within_the_kernel_limit(monkeypatch) -> None:
    """A long ``TMPDIR`` put Ray's dashboard sockets past 107 bytes: its modules died at start, Ray printed a
    traceback and ``ray.init`` waited ~60 s for a dashboard that never came (every demo test run paid it twice)."""
    from jobs.demo import ray_temp_dir
    from mplug2.runtime import init_ray, local_ray_temp_dir, ray_temp_dir_fits

    # the longest socket a Ray 2.60 session makes, with a 7-digit pid, must fit below the chosen folder
    longest = "/session_2026-12-02_07-39-56_694432_4194304/sockets/dash_MetricsHead"
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/" + "t" * 60)
    chosen = local_ray_temp_dir("mplug2-ray-0123abcd")
    assert chosen == "/tmp/mplug2-ray-0123abcd" and len(chosen + longest) <= 107
    assert ray_temp_dir(Path("outputs/demo")).startswith("/tmp/mplug2-ray-")
    monkeypatch.setattr(tempfile, "tempdir", "/tmp/m2d-abcdefgh")   # short enough: stays where the user said
    assert local_ray_temp_dir("mplug2-ray-0123abcd") == "/tmp/m2d-abcdefgh/mplug2-ray-0123abcd"
    assert not ray_temp_dir_fits("/tmp/m2d-abcdefgh/mplug2-demo-ray-0123abcd")   # the old demo folder: 108 bytes
    # an explicit temp dir that cannot work is refused in one line before anything starts
    with pytest.raises(ValueError, match="too long"):
        init_ray(temp_dir="/tmp/" + "t" * 60)


def test_mplug2_s3_env_prints_the_file_not_the_secret(tmp_path) -> None:
    from mplug2.s3server import write_credentials

    (tmp_path / "server.json").write_text(json.dumps({"pid": None, "port": 8333, "buckets": ["mplug2"],
                                                      "access_key": "mplug2"}))
    write_credentials(tmp_path / "credentials", "mplug2", "s3cr3t-value")
    env = {k: v for k, v in os.environ.items() if k != "MPLUG2_S3_SECRET"}
    out = subprocess.run([sys.executable, "-m", "mplug2.s3server", "env", "--dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "s3cr3t-value" not in out
    assert f"export AWS_SHARED_CREDENTIALS_FILE={tmp_path / 'credentials'}" in out
    assert out.startswith("unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY")


# ------------------------------------------------------------------------------------------- submitter

def test_forward_credentials_sends_a_0600_file_path_never_values(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE", raising=False)
    with pytest.raises(SubmitError, match="AWS_SECRET_ACCESS_KEY are set, but values are never forwarded"):
        build_runtime_env(RuntimeEnvSpec(forward_credentials=True), run="r")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = supersecretvalue\n")
    creds.chmod(0o644)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with pytest.raises(SubmitError, match="chmod 600"):
        build_runtime_env(RuntimeEnvSpec(forward_credentials=True), run="r")
    creds.chmod(0o600)
    env = build_runtime_env(RuntimeEnvSpec(forward_credentials=True), run="r")["env_vars"]
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(creds)
    assert "supersecretvalue" not in json.dumps(env) and "AKIDLOCAL" not in json.dumps(env)
    plain = build_runtime_env(RuntimeEnvSpec(), run="r")["env_vars"]
    assert "AWS_SHARED_CREDENTIALS_FILE" not in plain                 # nodes use their roles by default


class _JobServer(BaseHTTPRequestHandler):
    """Just enough of Ray's job HTTP API for a client to connect, find one RUNNING job, then lose the server."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/api/version":
            body = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}
        elif self.path.startswith("/api/jobs/") and "logs" not in self.path:
            body = [{"type": "SUBMISSION", "job_id": "01000000", "submission_id": "r", "driver_info": None,
                     "status": "RUNNING", "entrypoint": "python x.py", "message": None, "error_type": None,
                     "start_time": 1, "end_time": None, "metadata": {"mplug2_run": "r"}, "runtime_env": {},
                     "driver_agent_http_address": None, "driver_node_id": None, "driver_exit_code": None}]
        else:                      # the log stream: the server dies here
            self.close_connection = True
            self.connection.close()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_follow_reports_a_lost_job_server_in_one_line_with_exit_3(monkeypatch, capsys) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JobServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")     # --address must win over this
    try:
        code = submit_main(["logs", "r", "--follow", "--address", address])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE, err
    assert f"lost the Ray job server at {address}" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- storage credentials

def test_missing_credentials_fail_at_once_with_the_fix(monkeypatch) -> None:
    from botocore.exceptions import NoCredentialsError

    from mplug2.storage import StorageCredentialsError, retry_io

    calls = []

    def no_credentials():
        calls.append(1)
        raise NoCredentialsError()

    with pytest.raises(StorageCredentialsError, match="forward-credentials"):
        retry_io(no_credentials, deadline_s=120, what="list s3://b/x")
    assert calls == [1]                                               # not retried as an outage


# ---------------------------------------------------------------------------------------------- demo

def test_demo_refuses_sizes_it_cannot_train_on_and_shards_evenly() -> None:
    from jobs.demo import DemoConfig, main as demo_main, shard_size, validate_sizes

    with pytest.raises(ValueError, match="--images 16 is too small"):
        validate_sizes(DemoConfig(images=16))
    validate_sizes(DemoConfig(train_videos=64, images=32, qa_videos=32))
    assert demo_main(["--images", "8", "--workdir", "/nonexistent/never-created"]) == 2
    for rows in (32, 33, 64, 67, 131, 259):           # every rank gets at least a batch of 16 per epoch
        size = shard_size(rows, 2)
        shards = [min(size, rows - i) for i in range(0, rows, size)]
        assert len(shards) % 2 == 0 and min(shards) >= size - len(shards), (rows, shards)
