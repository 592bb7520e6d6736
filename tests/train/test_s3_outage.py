"""Checkpoints survive an S3 server crash (training-and-ops §1.4, "S3 realities"; ray#55350, ray#41137).

A real training run (``run_local``, tiny preset, local image shards) checkpoints every 2 steps to a SeaweedFS
bucket of its own (not the session's server, which other tests share). In the middle of the step-4 upload, after
its first file went up, the server is SIGKILLed:

- **restart**: it comes back on the same ports and data folder after ``DOWN_S`` seconds. The run must not notice
  beyond a delay: the upload retries (logged attempts) and completes, every checkpoint is complete, markers and
  manifest went up last, and running the same name again resumes from the newest checkpoint.
- **past the deadline**: it stays down longer than ``$MPLUG2_S3_RETRY_DEADLINE_S``. The run must fail loudly
  (``StorageUnavailableError`` naming the deadline), leave the half-uploaded step 4 invalid, and once the server
  is back the same command resumes from step 2 and ends bitwise where the uninterrupted run ended.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
import torch

from mplug2 import storage
from mplug2.train.checkpoint import (
    MANIFEST_FILE, STEP_PREFIX, find_latest_valid, list_step_checkpoints, read_model_tensors, validate_checkpoint,
)
from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_STEP = 6, 2, 4
DOWN_S = 8.0          # outage in the restart case
SHORT_DEADLINE_S = 10  # retry deadline in the give-up case (one attempt on a dead endpoint: ~5 s)


@pytest.fixture(scope="module")
def outage_env(tmp_path_factory):
    """Local image shards and a private SeaweedFS (bucket ``outage``), stopped at the end whatever happened."""
    from mplug2.s3server import S3Server
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_image_corpus

    root = tmp_path_factory.mktemp("outage")
    man = make_image_corpus(root / "media", 32, seed=3, size=48)
    shards = str(root / "shards")
    summary = preprocess(PreprocessConfig(manifest=[str(man)], output=shards, modality="image",
                                          samples_per_shard=8, image_size=32, executor="local", progress=False))
    assert summary.successes == 32
    srv = S3Server(root=root / "s3", buckets=("outage",))
    srv.start()
    try:
        yield srv, shards
    finally:
        srv.stop()


@pytest.fixture
def s3_env(outage_env, monkeypatch):
    srv, _ = outage_env
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if srv.pid is None:       # an earlier test left it down
        srv.start()
    return srv


def _cfg(shards: str, name: str) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        run_name=name, storage="s3://outage/runs", task="pretrain", seed=5,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}, "queue_size": 16},
        data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=4, shuffle_buffer=8,
                  max_text_len=16),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=2),
        schedule=dict(total_steps=STEPS, ckpt_every_steps=EVERY, log_every_steps=1, keep_last=10),
        scale=dict(num_workers=1),
        debug=dict(deterministic=True),
    ))


class KillDuringUpload:
    """Wraps :func:`mplug2.storage.upload_file`: before the ``nth`` file of step ``step`` goes up, SIGKILL the
    server and (if ``down_s``) restart it in place ``down_s`` later from a thread. Records every completed
    checkpoint upload in order."""

    def __init__(self, srv, step: int, nth: int, down_s: float | None):
        self.srv, self.step, self.nth, self.down_s = srv, step, nth, down_s
        self.orig = storage.upload_file
        self.seen = 0
        self.done: list[str] = []
        self.killed_at = self.back_at = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __call__(self, local: str, url: str) -> None:
        if f"/{STEP_PREFIX}{self.step:08d}/" in url and self.killed_at is None:
            self.seen += 1
            if self.seen == self.nth:
                self.srv.kill()
                self.killed_at = time.monotonic()
                if self.down_s is not None:
                    self.thread = threading.Thread(target=self._restart, daemon=True)
                    self.thread.start()
        self.orig(local, url)
        if f"/{STEP_PREFIX}" in url:          # checkpoint files (the run's logs go up the same way)
            self.done.append(url)

    def _restart(self) -> None:
        try:
            time.sleep(self.down_s)
            self.srv.start()
            self.back_at = time.monotonic()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _retry_records(caplog) -> tuple[list[int], list[str]]:
    """Attempt numbers of logged failed attempts, and the 'succeeded on attempt' lines."""
    failed = [int(m.group(1)) for r in caplog.records if r.name == "mplug2.storage"
              for m in [re.search(r"attempt (\d+) failed", r.getMessage())] if m]
    ok = [r.getMessage() for r in caplog.records if r.name == "mplug2.storage" and "succeeded on attempt" in r.getMessage()]
    return failed, ok


def _assert_complete(run_dir: str, steps: list[int]) -> None:
    found = list_step_checkpoints(run_dir)
    assert [int(c.rsplit("_", 1)[1]) for c in found] == steps, found
    for c in found:
        assert validate_checkpoint(c), c
        fs, path = storage.get_fs(c)
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False))
        assert names == sorted(["data_rank0.json", "done_rank0.json", MANIFEST_FILE, "model.safetensors",
                                "rng_rank0.pt", "trainer_state.pt"]), (c, names)


def _assert_commit_order(uploads: list[str]) -> None:
    """Per checkpoint folder: payload files, then the done marker, then the manifest, last."""
    by_dir: dict[str, list[str]] = {}
    for url in uploads:
        d, name = url.rsplit("/", 1)
        by_dir.setdefault(d, []).append(name)
    assert by_dir
    for d, names in by_dir.items():
        assert names[-1] == MANIFEST_FILE and names[-2] == "done_rank0.json", (d, names)


def test_checkpoint_upload_survives_s3_restart(outage_env, s3_env, monkeypatch, caplog):
    srv, shards = outage_env
    caplog.set_level(logging.INFO, logger="mplug2")
    monkeypatch.setenv("MPLUG2_S3_RETRY_DEADLINE_S", "120")
    kill = KillDuringUpload(srv, KILL_STEP, nth=2, down_s=DOWN_S)
    monkeypatch.setattr(storage, "upload_file", kill)
    cfg = _cfg(shards, "restart")
    t0 = time.monotonic()
    run_local(cfg)
    wall = time.monotonic() - t0
    kill.thread.join(60)
    assert kill.error is None, kill.error
    assert kill.killed_at is not None and kill.back_at is not None
    failed, ok = _retry_records(caplog)
    print(f"\nrun {wall:.1f} s; server down {kill.back_at - kill.killed_at:.1f} s; failed attempts logged "
          f"{len(failed)} (max attempt #{max(failed or [0])}); recoveries: {ok}")
    assert failed and ok, "the upload should have failed while the server was down, then succeeded"
    assert any(f"{STEP_PREFIX}{KILL_STEP:08d}/model.safetensors" in line for line in ok), ok

    run_dir = storage.join(cfg.storage, cfg.run_name)
    _assert_complete(run_dir, [2, 4, 6])
    _assert_commit_order(kill.done)
    assert find_latest_valid(list_step_checkpoints(run_dir)).endswith(f"{STEP_PREFIX}{STEPS:08d}")

    # The same command again: resumes from the newest checkpoint (step 6), trains nothing, still complete.
    caplog.clear()
    monkeypatch.setattr(storage, "upload_file", kill.orig)
    run_local(cfg)
    resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert resumed and f"{STEP_PREFIX}{STEPS:08d} at step {STEPS}" in resumed[0], resumed
    _assert_complete(run_dir, [2, 4, 6])


def test_outage_past_deadline_fails_loudly_then_resumes(outage_env, s3_env, monkeypatch, caplog):
    srv, shards = outage_env
    caplog.set_level(logging.INFO, logger="mplug2")
    monkeypatch.setenv("MPLUG2_S3_RETRY_DEADLINE_S", str(SHORT_DEADLINE_S))
    kill = KillDuringUpload(srv, KILL_STEP, nth=2, down_s=None)
    monkeypatch.setattr(storage, "upload_file", kill)
    cfg = _cfg(shards, "dead")
    with pytest.raises(storage.StorageUnavailableError, match="deadline") as info:
        run_local(cfg)
    gave_up_after = time.monotonic() - kill.killed_at
    failed, _ = _retry_records(caplog)
    print(f"\nstorage down: run failed {gave_up_after:.1f} s after the kill (deadline {SHORT_DEADLINE_S} s), "
          f"{len(failed)} failed attempts logged: {info.value}")
    assert "model.safetensors" in str(info.value)
    assert failed, "attempts before the deadline should have been logged"
    assert gave_up_after < SHORT_DEADLINE_S + 30, "the deadline should bound the wait"

    # Server back (same address, same data): step 4 is half-written and must not count.
    srv.start()
    monkeypatch.setenv("MPLUG2_S3_RETRY_DEADLINE_S", "120")
    monkeypatch.setattr(storage, "upload_file", kill.orig)
    run_dir = storage.join(cfg.storage, cfg.run_name)
    half = storage.join(run_dir, f"{STEP_PREFIX}{KILL_STEP:08d}")
    assert storage.exists(storage.join(half, "data_rank0.json")), "the first file went up before the kill"
    assert not storage.exists(storage.join(half, MANIFEST_FILE))
    assert not validate_checkpoint(half)
    assert find_latest_valid(list_step_checkpoints(run_dir)).endswith(f"{STEP_PREFIX}{EVERY:08d}")

    caplog.clear()
    run_local(cfg)
    resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert resumed and f"{STEP_PREFIX}{EVERY:08d} at step {EVERY}" in resumed[0], resumed
    _assert_complete(run_dir, [2, 4, 6])

    # Exact resume: the crashed-and-resumed run ends bitwise where an uninterrupted run of the same config ends
    # (the brief-outage run of the test above, or a fresh one when this test runs alone).
    ref = storage.join(cfg.storage, "restart", f"{STEP_PREFIX}{STEPS:08d}")
    if not storage.exists(storage.join(ref, MANIFEST_FILE)):
        run_local(_cfg(shards, "straight"))
        ref = storage.join(cfg.storage, "straight", f"{STEP_PREFIX}{STEPS:08d}")
    a, b = read_model_tensors(ref), read_model_tensors(storage.join(run_dir, f"{STEP_PREFIX}{STEPS:08d}"))
    assert a.keys() == b.keys() and any(k.startswith("momentum.") for k in a)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:5]}"
