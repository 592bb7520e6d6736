"""Operations acceptance: the real job entrypoints on a real Ray head, writing to the embedded S3 server.

1. ``python -m jobs.preprocess`` submitted with ``ray job submit`` turns a synthetic video corpus into shards;
   ``python -m jobs.pretrain`` trains on them as a Ray job, is stopped once a checkpoint is committed, and the
   resubmit through ``mplug2-submit`` (``<run>-r1``) resumes from the newest committed checkpoint and finishes.
2. ``python -m jobs.schedule_preprocess`` behaves as a schedule needs: a tick with no new rows writes nothing,
   appended rows become new shards after the last (earlier shards untouched), and two overlapping ticks never
   write the same shard.

Jobs get the S3 endpoint and the loopback server's credentials explicitly (runtime_env ``env_vars`` /
``--forward-credentials``): the session's Ray head may have been started before the S3 server.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from mplug2 import storage
from mplug2.runtime import forwarded_env

from .conftest import RAY, REPO, RayHead

pytestmark = pytest.mark.slow

PY = sys.executable  # the job driver runs in the head's environment, whose PATH may not lead to this venv
SUBMIT = [PY, "-m", "jobs.submit"]
FRAMES, FRAME_SIZE = 4, 32


# ------------------------------------------------------------------------------------------------ helpers


def wait_for(predicate, timeout: float, what: str, every: float = 0.3):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def job_status(head: RayHead, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address).get_job_status(sid).value


def job_env(head: RayHead) -> dict[str, str]:
    """The CLI environment: the head's, plus this session's S3 endpoint and credentials."""
    return {**head.env, **forwarded_env()}


def run_cli(head: RayHead, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=job_env(head), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def runtime_env_json(name: str) -> str:
    """What ``ray job submit`` gets: the repository as working_dir, the named env file's env_vars, and the S3
    env (endpoint + loopback credentials; a real cluster gets credentials from instance roles instead)."""
    import yaml

    spec = yaml.safe_load((REPO / "jobs" / "runtime_env" / f"{name}.yaml").read_text())
    env = {**spec.get("env_vars", {}), **forwarded_env(), "RAY_AUTH_MODE": "disabled"}
    return json.dumps({"working_dir": str(REPO), "excludes": [".venv", ".git", "outputs", ".s3", "bench/.cache"],
                       "env_vars": env})


def checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the valid checkpoints under a run: ``manifest.json`` plus every rank's marker and files (on
    Ray each rank uploads its own part, so a manifest alone does not make a checkpoint usable)."""
    from mplug2.train.checkpoint import validate_checkpoint

    fs, path = storage.get_fs(run_dir)
    fs.invalidate_cache()
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[len("step_"):]) for n in names
                  if re.fullmatch(r"step_\d{8}", n) and validate_checkpoint(storage.join(run_dir, n)))


def stable_checkpoints(run_dir: str, quiet_s: float = 2.0, timeout: float = 30.0) -> list[int]:
    """:func:`checkpoint_steps` once it has not changed for ``quiet_s`` seconds."""
    last, since, deadline = checkpoint_steps(run_dir), time.time(), time.time() + timeout
    while time.time() - since < quiet_s and time.time() < deadline:
        time.sleep(0.5)
        now = checkpoint_steps(run_dir)
        if now != last:
            last, since = now, time.time()
    return last


def object_digests(prefix: str) -> dict[str, str]:
    """``{name: sha256}`` of every object under an S3 prefix (a fresh listing, no cache)."""
    fs, path = storage.get_fs(prefix)
    fs.invalidate_cache()
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return {}
    return {n: hashlib.sha256(fs.cat_file(f"{path}/{n}")).hexdigest() for n in names}


def tar_samples(url: str) -> list[dict]:
    """The samples of a shard in tar order: each ``json`` record plus its ``txt`` caption."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            data = tar.extractfile(m).read()
            rec = samples.setdefault(key, {})
            if ext == "json":
                rec.update(json.loads(data))
            elif ext == "txt":
                rec["caption"] = data.decode()
    return list(samples.values())


# ------------------------------------------------------------------------------------------------ 1. jobs


def test_preprocess_then_pretrain_stop_and_resubmit_resumes(ray_head: RayHead, s3_server, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    from pipelines.synthetic import make_video_corpus
    from pipelines.verify import verify_dataset

    head = ray_head
    t0 = time.time()
    manifest = make_video_corpus(tmp_path / "corpus", 32, seed=3, num_frames=8, size=48)
    shards = f"{s3_bucket}/corpora/videos"

    # (a) preprocessing as a Ray job; without --no-wait the CLI tails the logs and exits 0 iff SUCCEEDED.
    pre_id = f"pre-{uuid.uuid4().hex[:6]}"
    pre = run_cli(head, RAY, "job", "submit", "--address", head.address, "--submission-id", pre_id,
                  "--runtime-env-json", runtime_env_json("preprocess"), "--",
                  PY, "-m", "jobs.preprocess", "--manifest", str(manifest), "--output", shards,
                  "--modality", "video", "--samples-per-shard", "8", "--num-frames", str(FRAMES),
                  "--frame-size", str(FRAME_SIZE), "--resize-mode", "center_crop", "--no-progress")
    assert pre.returncode == 0, pre.stdout[-4000:] + pre.stderr[-4000:]
    assert job_status(head, pre_id) == "SUCCEEDED"
    dataset = json.loads(storage.read_bytes(f"{shards}/dataset.json"))
    assert [s["name"] for s in dataset["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert dataset["num_samples"] == 32 and dataset["complete"]
    assert verify_dataset(shards, "train") == []
    samples = tar_samples(f"{shards}/train-000000.tar")
    assert len(samples) == 8 and all(s["caption"].startswith("a ") for s in samples)
    t_pre = time.time() - t0

    # (b) pretraining as a Ray job: attempt 0 under the run name, via the plain Ray CLI.
    run = f"pt-{uuid.uuid4().hex[:6]}"
    runs = f"{s3_bucket}/runs"
    train = [PY, "-m", "jobs.pretrain", "--config", "configs/pretrain_tiny.yaml", "--run-name", run,
             "--storage", runs,
             "--set", f"data.train=[{{name: videos, path: '{shards}', num_frames: {FRAMES}}}]",
             "--set", "data.batch_size=16",  # ~0.5 s/step on 2 cores: time to stop the job mid-run
             "--set", "schedule.total_steps=40", "--set", "schedule.ckpt_every_steps=5",
             "--set", "schedule.log_every_steps=5", "--set", "optim.warmup_steps=5",
             "--set", "scale.num_workers=2", "--set", "scale.cpus_per_worker=0.5"]
    first = run_cli(head, RAY, "job", "submit", "--address", head.address, "--submission-id", run, "--no-wait",
                    "--runtime-env-json", runtime_env_json("pretrain"), "--", *train)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = storage.join(runs, run)
    seen = wait_for(lambda: checkpoint_steps(run_dir), 180, "the first committed checkpoint")
    assert job_status(head, run) == "RUNNING", "the run finished before it could be stopped; slow its steps"

    stop = run_cli(head, *SUBMIT, "stop", "--address", head.address, run)
    assert stop.returncode == 0 and f"stop requested: run={run} submission_id={run}" in stop.stdout, stop.stdout
    wait_for(lambda: job_status(head, run) == "STOPPED", 60, "attempt 0 to stop")
    # The job's workers die just after the driver: wait until no checkpoint part lands any more.
    committed = stable_checkpoints(run_dir)
    assert committed and seen[0] <= committed[-1] < 40
    t_stop = time.time() - t0

    # Resubmit with the same run name: mplug2-submit reads STOPPED and submits <run>-r1, which resumes.
    again = run_cli(head, *SUBMIT, "submit", "--address", head.address, "--run-name", run, "--runtime-env",
                    "pretrain", "--forward-credentials", "--follow", "--", *train, timeout=300)
    logs = again.stdout
    assert again.returncode == 0, logs[-6000:] + again.stderr[-3000:]
    assert f"submitted: run={run} submission_id={run}-r1" in logs
    assert f"finished: run={run} submission_id={run}-r1 status=SUCCEEDED" in logs
    assert job_status(head, f"{run}-r1") == "SUCCEEDED"
    resumed = {(int(m.group(1)), int(m.group(3))) for m in
               re.finditer(r"rank (\d+): resumed from (\S+) at step (\d+)", logs)}
    assert {rank for rank, _ in resumed} == {0, 1}, logs[-6000:]
    steps = {step for _, step in resumed}
    assert steps == {committed[-1]}, f"resumed at {steps}, newest committed checkpoint was {committed}"
    assert "fresh start" not in logs
    assert 40 in checkpoint_steps(run_dir), "the final checkpoint step_00000040 is missing"

    # The resumed attempt logged steps after the resume point only (metrics.jsonl is per run, appended).
    metrics = [json.loads(line) for line in storage.read_bytes(f"{run_dir}/logs/metrics.jsonl").splitlines()
               if line.strip()]
    logged = [int(m["step"]) for m in metrics if "step" in m]
    assert logged and max(logged) == 40
    print(f"\npreprocess job {t_pre:.0f}s; attempt 0 stopped with checkpoints {committed} after {t_stop:.0f}s; "
          f"{run}-r1 resumed from step {committed[-1]} and finished at step 40 ({time.time() - t0:.0f}s total)")


# ------------------------------------------------------------------------------------------ 2. schedule


def schedule_tick(manifest: Path, output: str, *, wait: bool = True):
    cmd = [sys.executable, "-m", "jobs.schedule_preprocess", "--manifest", str(manifest), "--output", output,
           "--modality", "video", "--samples-per-shard", "4", "--num-frames", str(FRAMES),
           "--frame-size", str(FRAME_SIZE), "--resize-mode", "center_crop", "--executor", "local",
           "--num-cpus", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=180) + (proc.returncode,) if wait else proc


def written(stdout: str) -> int:
    m = re.search(r"^shards\s+(\d+) written", stdout, re.M)
    return int(m.group(1)) if m else 0


def test_scheduled_preprocess_is_incremental_and_single_writer(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    from pipelines.shards import make_key
    from pipelines.synthetic import make_video_corpus

    rows = make_video_corpus(tmp_path / "corpus", 28, seed=5, num_frames=8, size=48).read_text().splitlines()
    manifest = tmp_path / "manifests" / "videos.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(rows[:12]) + "\n")
    out = f"{s3_bucket}/scheduled"

    # Tick 1 builds shards 0-2; tick 2, same manifest, writes nothing and leaves every object as it was.
    stdout, stderr, rc = schedule_tick(manifest, out)
    assert rc == 0 and written(stdout) == 3, stdout + stderr
    before = object_digests(out)
    assert sorted(n for n in before if n.endswith(".tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    stdout, stderr, rc = schedule_tick(manifest, out)
    assert rc == 0, stdout + stderr
    assert "no new manifest rows; no shard written" in stdout and written(stdout) == 0
    assert re.search(r"^samples\s+0 attempted", stdout, re.M), stdout
    assert object_digests(out) == before

    # Appended rows become shards 3-4; keys continue the row numbering; shards 0-2 stay byte-identical.
    with open(manifest, "a") as f:
        f.write("\n".join(rows[12:20]) + "\n")
    stdout, stderr, rc = schedule_tick(manifest, out)
    assert rc == 0 and written(stdout) == 2, stdout + stderr
    assert re.search(r"^samples\s+8 attempted, 8 written", stdout, re.M), stdout
    after = object_digests(out)
    assert {n: d for n, d in after.items() if n in before and n.startswith("train-")} == \
           {n: d for n, d in before.items() if n.startswith("train-")}
    assert sorted(n for n in after if n.endswith(".tar")) == [f"train-{i:06d}.tar" for i in range(5)]
    for shard in (3, 4):
        recs = tar_samples(f"{out}/train-{shard:06d}.tar")
        assert [r["key"] for r in recs] == [make_key(shard, r) for r in range(4)]
        assert [r["source_index"] for r in recs] == [4 * shard + r for r in range(4)]
        assert [r["url"] for r in recs] == [json.loads(rows[4 * shard + r])["path"] for r in range(4)]
    dataset = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    assert len(dataset["shards"]) == 5 and dataset["num_samples"] == 20 and dataset["complete"]

    # Two overlapping ticks over 8 more rows: exactly one writes shards 5-6, the other meets the lease (or,
    # if it started after the first finished, finds no new rows). Both exit 0; nothing is written twice.
    with open(manifest, "a") as f:
        f.write("\n".join(rows[20:28]) + "\n")
    procs = [schedule_tick(manifest, out, wait=False) for _ in range(2)]
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0], results
    counts = sorted(written(o) for o, _, _ in results)
    assert counts == [0, 2], results
    idle = next(o for o, _, _ in results if written(o) == 0)
    assert ("another run holds the lease" in idle) or ("no new manifest rows" in idle), idle
    final = object_digests(out)
    assert sorted(n for n in final if n.endswith(".tar")) == [f"train-{i:06d}.tar" for i in range(7)]
    assert {n: d for n, d in final.items() if n in after and n.startswith("train-")} == \
           {n: d for n, d in after.items() if n.startswith("train-")}
    assert "_writer.lock" not in final and not any("pending" in n for n in final)
    keys, sources = [], []
    for shard in range(7):
        recs = tar_samples(f"{out}/train-{shard:06d}.tar")
        keys += [r["key"] for r in recs]
        sources += [r["source_index"] for r in recs]
    assert len(keys) == len(set(keys)) == 28 and sources == list(range(28))
    dataset = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    assert dataset["num_samples"] == 28 and len(dataset["shards"]) == 7
    print(f"\noverlapping ticks: {[o.splitlines()[0] if o else '' for o, _, _ in results]}")
