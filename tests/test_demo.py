"""The main job (``mplug2-demo``) on a small corpus: Ctrl-C mid-run stops every process it started, and the
same command run again skips completed stages, finishes, prints the results table and writes the plots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.demo import ray_temp_dir

pytestmark = pytest.mark.slow

SMALL = ["--train-videos", "64", "--eval-videos", "12", "--images", "64", "--qa-videos", "64",
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


def test_ctrl_c_then_rerun_resumes_and_cleans_up(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "jobs.demo", "--workdir", str(workdir), *SMALL]
    needles = (str(workdir / "s3"), ray_temp_dir(workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        marker = workdir / "stages" / "preprocess.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(3)                                           # inside the pretraining stage now
        os.killpg(proc.pid, signal.SIGINT)                      # what Ctrl-C sends to the foreground group
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    out1 = (tmp_path / "run1.log").read_text()
    assert rc != 0, out1[-2000:]
    assert not (workdir / "stages" / "finetune_qa.json").exists()
    assert _wait_gone(needles) == [], "processes left after Ctrl-C"

    run2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out2 = run2.stdout + run2.stderr
    assert run2.returncode == 0, out2[-4000:]
    assert "[demo] corpus: done earlier, skipped" in out2
    assert "[demo] preprocess: done earlier, skipped" in out2
    assert "text→video R@1" in out2 and "caption CIDEr (pycocoevalcap)" in out2 and "QA accuracy" in out2
    assert "TrainingReport(" not in out2 and "RayTrainWorker" not in out2   # Ray's raw logs stay in files
    assert "chance" in out2 and "(ITC alone)" in out2
    for stage in ("pretrain", "finetune_retrieval", "finetune_caption", "finetune_qa"):
        assert (workdir / "stages" / f"{stage}.json").exists()
    assert (workdir / "curves_pretrain.png").stat().st_size > 10_000
    assert (workdir / "results.json").exists()
    assert _wait_gone(needles) == [], "processes left after the run"

    run3 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run3.returncode == 0 and "finetune_qa: done earlier, skipped" in run3.stdout
