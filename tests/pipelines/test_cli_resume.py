"""The command line as users run it: --help everywhere, start-up errors, and SIGKILL mid-run + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import shards
from pipelines.verify import verify_dataset
from tests.hygiene import named_semaphores, unmapped
from tests.pipelines.conftest import write_images

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(*args, **kw):
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def test_help_for_every_command():
    for args in (["-m", "pipelines.cli", "--help"], ["-m", "pipelines.cli", "shard", "--help"],
                 ["-m", "pipelines.cli", "verify", "--help"], ["-m", "jobs.preprocess", "--help"]):
        res = _run(*args)
        assert res.returncode == 0 and "usage:" in res.stdout, res.stderr
    shard_help = _run("-m", "pipelines.cli", "shard", "--help").stdout
    for flag in ("--manifest", "--output", "--modality", "--mode", "--retry-failed", "--max-failure-ratio",
                 "--url-col", "--caption-col", "--preset", "--samples-per-shard", "--keep-video"):
        assert flag in shard_help


def test_bad_manifest_fails_before_writing(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("link,caption\nhttp://x/a.jpg,a\n")
    out = tmp_path / "out"
    res = _run("-m", "pipelines.cli", "shard", "--manifest", str(man), "--output", str(out), "--local")
    assert res.returncode == 2 and "media column 'url' not found" in res.stderr
    assert not out.exists()


def test_failure_ratio_sets_exit_code(tmp_path):
    write_images(tmp_path / "img", 2)
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"url": u, "caption": "c"}) + "\n"
                           for u in ("img/img0000.jpg", "img/img0001.jpg", "img/none.jpg")))
    args = ["-m", "pipelines.cli", "shard", "--manifest", str(man), "--local", "--no-progress"]
    strict = _run(*args, "--output", str(tmp_path / "a"), "--max-failure-ratio", "0.2")
    assert strict.returncode == 1 and "not_found" in strict.stdout
    assert verify_dataset(str(tmp_path / "a")) == []  # everything was still written
    assert _run(*args, "--output", str(tmp_path / "b"), "--max-failure-ratio", "0.5").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigkill_mid_run_then_incremental_resume(tmp_path, http_server, executor):
    """Kill the CLI (and its workers) after a few shards commit; the re-run completes every row exactly once.
    ``ray``: the run starts its own Ray (in a fresh temp dir, so it joins no other cluster on this machine)
    and streams shards through the Ray Data stages; the kill takes the driver and Ray's daemons, and Ray's
    workers end on their own (a shard task that outlives its driver must not commit under the dead lease)."""
    import tempfile

    imgs = write_images(tmp_path / "img", 48)
    for p in imgs:
        http_server.routes[f"/{p.name}"] = (200, {}, p.read_bytes())
    http_server.delay_s = 0.15  # slow network: the kill lands mid-run
    man = tmp_path / "m.jsonl"
    urls = [http_server.url(f"/{p.name}") for p in imgs]
    man.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    cmd = [PY, "-m", "pipelines.cli", "shard", "--manifest", str(man), "--output", str(out), "--executor", executor,
           "--num-cpus", "2", "--samples-per-shard", "4", "--threads", "2", "--no-progress"]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    semaphores = named_semaphores()
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if out.exists() and len([n for n in os.listdir(out) if n.endswith("_stats.json")]) >= 3:
                    break
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-write
        finally:
            proc.wait(timeout=30)
        # Ray workers run in process groups of their own: they outlive the kill until they see their raylet
        # gone (~1 s; 10 s at load 36), and one may be mid-commit. Count commits once the whole run is gone.
        deadline = time.monotonic() + 120
        while _run_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _run_processes(ray_tmp), "processes of the killed run outlived it by 2 minutes"
        committed = {n for n in os.listdir(out) if n.endswith("_stats.json")}
        assert 3 <= len(committed) < 12, "the kill must land mid-run"
        assert not (out / "dataset.json").exists()  # loaders see no dataset yet, so no uncommitted shard either
        # the kill took the local pool's resource tracker too (same group): its named semaphores are ours to remove
        for path in unmapped(named_semaphores() - semaphores):
            path.unlink(missing_ok=True)
        semaphores = named_semaphores()
        http_server.delay_s = 0.0
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    finally:
        _kill_leftovers(ray_tmp)
    assert unmapped(named_semaphores() - semaphores) == [], "a run that ended cleanly left semaphores in /dev/shm"
    assert res.returncode == 0, res.stderr[-2000:]
    # only the uncommitted shards were redone
    assert f"{12 - len(committed)} written, {len(committed)} skipped" in res.stdout, res.stdout
    assert verify_dataset(str(out)) == []
    ds = json.loads((out / "dataset.json").read_text())
    assert len(ds["shards"]) == 12
    seen = []
    for s in ds["shards"]:
        for key, fields in shards.read_tar((out / s["name"]).read_bytes()).items():
            seen.append(json.loads(fields["json"])["url"])
    assert sorted(seen) == sorted(urls)  # every row exactly once
    assert not [n for n in os.listdir(out) if n.startswith(".staging-") or ".partial" in n]
    assert not (out / shards.LOCK_NAME).exists()


def _run_processes(ray_tmp: str) -> list[int]:
    """Live processes of a run started with ``RAY_TMPDIR=ray_tmp``: the CLI, its pool workers, Ray's
    daemons and Ray's workers (which rename their command line, ``ray::IDLE``, but keep the environment)."""
    mark = f"RAY_TMPDIR={ray_tmp}".encode() + b"\0"
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read() + b"\0":  # (a zombie, finished, shows an empty environment)
                    pids.append(int(pid))
        except OSError:  # gone already, or not ours to read
            pass
    return pids


def _kill_leftovers(ray_tmp: str) -> None:
    """SIGKILL what is left of the runs that used ``ray_tmp``, then remove it."""
    import shutil

    for pid in _run_processes(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
