"""End-to-end: the real ``ray job submit`` CLI and ``mplug2-submit`` against a real Ray head on 127.0.0.1.

The entrypoint is ``tests/ops/resumable_job.py``: a step counter persisted after each step, standing in for a
training run's checkpoint. What users rely on: a stopped or failed run resumes under ``<run>-r<n>``, a duplicate
submit never starts a second copy, a finished run is not rerun, and racing submits yield one job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.submit import EXIT_NOT_FOUND, main

from .conftest import RAY, REPO, RayHead

pytestmark = pytest.mark.slow

SUBMIT = [sys.executable, "-m", "jobs.submit"]
JOB = "tests/ops/resumable_job.py"


def job_args(state: Path, steps: int, sleep: float, *extra: str) -> list[str]:
    return ["python", JOB, "--state", str(state), "--steps", str(steps), "--sleep", str(sleep), *extra]


def read_state(state: Path) -> dict:
    return json.loads(state.read_text()) if state.exists() else {"step": 0, "attempts": []}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def ray_status(head: RayHead, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address).get_job_status(sid).value


def submit(head: RayHead, run: str, *entry: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return head.run(*SUBMIT, "submit", "--address", head.address, "--run-name", run, *extra, "--", *entry)


def test_stop_resubmit_resumes_then_duplicate_and_done(ray_head: RayHead, tmp_path: Path) -> None:
    run = f"resume-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state.json"

    # Attempt 0 via the real Ray CLI, under the deterministic id (= run name), then stopped mid-run.
    head = ray_head
    head.run(RAY, "job", "submit", "--address", head.address, "--submission-id", run, "--working-dir", str(REPO),
             "--no-wait", "--", *job_args(state, 400, 0.25), check=True)
    wait_for(lambda: read_state(state)["step"] >= 3, 90, "attempt 0 to reach step 3")
    head.run(RAY, "job", "stop", "--address", head.address, "--no-wait", run, check=True)
    wait_for(lambda: ray_status(head, run) == "STOPPED", 60, "attempt 0 to stop")
    stopped_at = read_state(state)["step"]
    assert 3 <= stopped_at < 400

    # Resubmit with the same run name: mplug2-submit reads STOPPED and submits <run>-r1.
    steps = stopped_at + 12
    first = submit(head, run, *job_args(state, steps, 0.5))
    assert first.returncode == 0, first.stderr
    assert f"submitted: run={run} submission_id={run}-r1" in first.stdout

    # A duplicate submit while r1 is active must not start another job.
    dup = submit(head, run, *job_args(state, steps, 0.5))
    assert dup.returncode == 0, dup.stderr
    assert f"already running: run={run} submission_id={run}-r1" in dup.stdout

    follow = head.run(*SUBMIT, "logs", "--address", head.address, run, "--follow", timeout=180)
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"resumed from step {stopped_at}" in follow.stdout
    print(f"\nattempt 0 stopped at step {stopped_at}; {run}-r1 resumed from step {stopped_at} and finished")

    final = read_state(state)
    assert final["step"] == steps
    assert [a["start"] for a in final["attempts"]] == [0, stopped_at]
    assert final["attempts"][1]["run_env"] == run  # the submitter told the entrypoint its run name

    done = submit(head, run, *job_args(state, steps, 0.5))
    assert done.returncode == 0
    assert f"done: run={run} submission_id={run}-r1" in done.stdout
    status = head.run(*SUBMIT, "status", "--address", head.address, run, check=True)
    assert f"submission_id={run}-r1 attempt=1 status=SUCCEEDED" in status.stdout
    assert ray_status(head, f"{run}-r1") == "SUCCEEDED"
    assert ray_status(head, run) == "STOPPED"


def test_failed_run_resubmits_next_attempt_and_follow_exit_codes(ray_head: RayHead, tmp_path: Path) -> None:
    run = f"fail-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state.json"
    entry = job_args(state, 4, 0.1, "--fail-at", "3", "--run-name", "{run_name}")

    failed = submit(ray_head, run, *entry, extra=("--follow",))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "injected failure at step 3" in failed.stdout
    assert f"finished: run={run} submission_id={run} status=FAILED" in failed.stdout

    ok = submit(ray_head, run, *entry, extra=("--follow",))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"submitted: run={run} submission_id={run}-r1" in ok.stdout
    assert "resumed from step 2" in ok.stdout
    final = read_state(state)
    assert final["step"] == 4
    assert all(a["run_arg"] == run for a in final["attempts"])  # {run_name} was substituted


def test_concurrent_submits_produce_one_job(ray_head: RayHead, tmp_path: Path) -> None:
    run = f"race-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state.json"
    cmd = [*SUBMIT, "submit", "--address", ray_head.address, "--run-name", run, "--",
           *job_args(state, 20, 0.5)]
    procs = [subprocess.Popen(cmd, env=ray_head.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = sorted(o[0].strip() for o in outs)
    assert lines[0].startswith(f"already running: run={run} submission_id={run}"), lines
    assert lines[1].startswith(f"submitted: run={run} submission_id={run}"), lines

    listed = json.loads(ray_head.run(*SUBMIT, "status", "--address", ray_head.address, run, "--json",
                                     check=True).stdout)
    assert [a["submission_id"] for a in listed] == [run]
    ray_head.run(*SUBMIT, "stop", "--address", ray_head.address, run, check=True)
    wait_for(lambda: ray_status(ray_head, run) == "STOPPED", 60, "the race job to stop")
    assert len(read_state(state)["attempts"]) == 1


def test_unknown_run_is_not_found(ray_head: RayHead, capsys) -> None:
    assert main(["status", "never-submitted-run", "--address", ray_head.address]) == EXIT_NOT_FOUND
    assert "no job for run 'never-submitted-run'" in capsys.readouterr().err


def test_list_shows_runs_with_latest_attempt(ray_head: RayHead) -> None:
    out = ray_head.run(*SUBMIT, "list", "--address", ray_head.address, "--json", check=True).stdout
    rows = {r["run"]: r for r in json.loads(out)}
    resumed = [r for name, r in rows.items() if name.startswith("resume-")]
    assert resumed and resumed[0]["attempts"] == 2 and resumed[0]["status"] == "SUCCEEDED"
    assert resumed[0]["latest"].endswith("-r1")
