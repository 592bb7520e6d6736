"""A 2-worker training run as a user starts it (``mplug2-train pretrain`` in a shell with S3 credentials):

- while it runs, every TCP socket its processes listen on (Ray, the workers, torch's rendezvous store, gloo)
  is on loopback;
- the S3 secret of its environment appears in no file under Ray's temp folder, the run's work folder or the
  S3 server's folder (Ray logs runtime envs in plain text: credentials must not travel in them);
- after it fails (an injected worker crash, no restarts), nothing of it is left in the temp folder but
  Ray's own session folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hygiene import descendants, files_containing, is_loopback, listening_sockets, listening_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_tmp():
    """A short, empty TMPDIR for the run (Unix socket paths under it must stay below 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="m2h-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_worker_run_listens_on_loopback_leaks_no_secret_and_leaves_no_temp_files(tmp_path, fresh_tmp):
    from mplug2.s3server import S3Server
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_image_corpus

    man = make_image_corpus(tmp_path / "media", 32, seed=4, size=32)
    shards = str(tmp_path / "shards")
    assert preprocess(PreprocessConfig(manifest=[str(man)], output=shards, modality="image", samples_per_shard=8,
                                       image_size=32, executor="local", progress=False)).successes == 32
    secret = "hyg-" + secrets.token_hex(16)
    work = tmp_path / "work"
    work.mkdir()
    with S3Server(root=tmp_path / "s3", buckets=("hyg",), secret_key=secret) as srv:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        env.update({   # the node's environment holds the key itself: the hardest case for leaks
            "AWS_ENDPOINT_URL_S3": srv.endpoint_url, "AWS_ACCESS_KEY_ID": srv.access_key,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "TMPDIR": str(fresh_tmp), "PYTHONPATH": str(REPO), "MPLUG2_S3_RETRY_DEADLINE_S": "20"})
        cmd = [sys.executable, "-m", "mplug2.train.cli", "pretrain", "--config", "configs/pretrain_tiny.yaml",
               "--run-name", "hyg", "--storage", "s3://hyg/runs", "--num-cpus", "2",
               "--set", f"data.train=[{{name: images, path: '{shards}', num_frames: 1}}]",
               "--set", "data.batch_size=4", "--set", "data.shuffle_buffer=8",
               "--set", "schedule.total_steps=8", "--set", "schedule.ckpt_every_steps=2",
               "--set", "schedule.log_every_steps=1", "--set", "optim.warmup_steps=1",
               "--set", "scale.max_failures=0", "--set", "debug.fail_at_step=5", "--set", "debug.fail_rank=1"]
        log = open(tmp_path / "run.log", "w")
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        listeners: dict[tuple[str, int], str] = {}
        try:
            while True:   # sample the run's process tree until it ends
                table = listening_table()   # one read of the namespace's table per sample: fast under load
                for pid, cmdline in descendants(proc.pid).items():
                    for addr in listening_sockets(pid, table):
                        listeners.setdefault(addr, cmdline[:80])
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            log.close()
        out = (tmp_path / "run.log").read_text()
        assert proc.returncode != 0, out[-3000:]
        assert "injected failure after step 5" in out, out[-3000:]
        assert any("RayTrainWorker" in c for c in listeners.values()), listeners   # the rendezvous store
        public = {a: c for a, c in listeners.items() if not is_loopback(a[0])}
        assert public == {}, f"listening beyond loopback: {public}"

    roots = [fresh_tmp, work, tmp_path / "s3"]
    assert files_containing(roots, secret, skip={tmp_path / "s3" / "credentials"}) == []
    assert sorted(os.listdir(fresh_tmp)) == ["ray"], sorted(os.listdir(fresh_tmp))
