"""Checkpoints off the critical path, in real tiny runs: the step copies the state into memory, a background
thread writes and uploads it. The copy is the state of its step even when written after training moved on;
one checkpoint is in flight at most; the run returns only once the last one is on storage; a background
failure stops the run with its own error, and a failed run on S3 leaves no temp folders behind."""

from __future__ import annotations

import tempfile
import threading

import pytest
import torch

from mplug2 import storage
from mplug2.train import loop as loop_mod
from mplug2.train.checkpoint import STEP_PREFIX, list_step_checkpoints, read_model_tensors, validate_checkpoint
from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local
from tests.data.shards_fixture import write_shards

WAIT_S = 120       # an upper bound on waiting for an event, only reached when the code under test is broken


def _cfg(shards: str, storage_url: str, name: str, total: int, every: int) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        run_name=name, storage=storage_url, task="pretrain", seed=4,
        model={"preset": "tiny", "queue_size": 16, "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}},
        data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=4, shuffle_buffer=8,
                  shards_in_flight=2, max_text_len=12),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=1),
        schedule=dict(total_steps=total, ckpt_every_steps=every, log_every_steps=1, keep_last=10),
        scale=dict(num_workers=1),
    ))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("async-ckpt") / "images")
    write_shards(prefix, [16, 16], size=(40, 36))
    return prefix


def test_snapshot_holds_its_step_one_in_flight_and_the_run_waits_for_the_last(shards, tmp_path, monkeypatch):
    """Checkpoints at steps 2, 4, 5. The step-2 write waits until step 3 has trained (so the live weights
    moved on before it serialised); the step-5 one waits until the run's closing wait has begun."""
    after_step: dict[int, dict[str, torch.Tensor]] = {}
    trained3, closing = threading.Event(), threading.Event()
    lock, active, max_active, events = threading.Lock(), [0], [0], []
    real_job, real_step = loop_mod.write_and_upload, loop_mod.TrainLoop.train_step
    real_wait, real_report = loop_mod.LocalHooks.wait_for_upload, loop_mod.LocalHooks.report

    def job(checkpoint, upload):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        try:
            if checkpoint.step == 2:
                assert trained3.wait(WAIT_S), "training never reached step 3 while step 2 was being checkpointed"
            if checkpoint.step == 5:
                assert closing.wait(WAIT_S), "the run never began its closing wait"
            out = real_job(checkpoint, upload)
            events.append(f"written {checkpoint.step}")
            return out
        finally:
            with lock:
                active[0] -= 1

    def train_step(self):
        out = real_step(self)
        after_step[self.step] = {k: v.detach().clone() for k, v in self.task.state_dict().items()}
        if self.step == 3:
            trained3.set()
        return out

    def report(self, metrics, checkpoint, step):
        real_report(self, metrics, checkpoint, step)
        if checkpoint is not None:
            events.append(f"reported {step}")

    def wait_for_upload(self, block=True):
        if block and events and events[-1] == "reported 5":      # the wait after the last step
            events.append("closing wait")
            closing.set()
        return real_wait(self, block)

    monkeypatch.setattr(loop_mod, "write_and_upload", job)
    monkeypatch.setattr(loop_mod.TrainLoop, "train_step", train_step)
    monkeypatch.setattr(loop_mod.LocalHooks, "report", report)
    monkeypatch.setattr(loop_mod.LocalHooks, "wait_for_upload", wait_for_upload)
    cfg = _cfg(shards, str(tmp_path), "async", total=5, every=2)
    run_local(cfg)
    events.append("returned")

    assert max_active[0] == 1, "two checkpoints were in flight at once"
    assert events.index("reported 4") > events.index("written 2"), events   # step 4 waited for step 2
    assert events[-3:] == ["closing wait", "written 5", "returned"], events
    run_dir = storage.join(cfg.storage, cfg.run_name)
    found = list_step_checkpoints(run_dir)
    assert [int(c.rsplit("_", 1)[1]) for c in found] == [2, 4, 5] and all(validate_checkpoint(c) for c in found)
    saved = read_model_tensors(storage.join(run_dir, f"{STEP_PREFIX}{2:08d}"))
    moved = [k for k in after_step[2] if not torch.equal(after_step[2][k], after_step[3][k])]
    assert moved, "step 3 changed no weight: the test would not see a late copy"
    differ = [k for k in after_step[2] if not torch.equal(saved[k], after_step[2][k])]
    assert not differ, f"the step-2 checkpoint holds weights from after step 2: {differ[:5]}"


def test_background_failure_stops_the_run_and_a_failed_s3_run_leaves_no_temp_folders(
        shards, s3_bucket, tmp_path, monkeypatch):
    """The step-2 upload fails in the background: the training thread raises that error (at the check after a
    step or at the next checkpoint) instead of finishing; the local copies (logs, checkpoint folders) go."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))     # where the run's temp folders go
    real_upload = loop_mod.upload_checkpoint

    def upload(local: str, dest: str):
        if dest.endswith(f"{STEP_PREFIX}{2:08d}"):
            raise OSError("disk quota exceeded while uploading step 2")
        return real_upload(local, dest)

    monkeypatch.setattr(loop_mod, "upload_checkpoint", upload)
    cfg = _cfg(shards, s3_bucket, "fails", total=4, every=2)
    with pytest.raises(OSError, match="disk quota exceeded while uploading step 2"):
        run_local(cfg)
    run_dir = storage.join(cfg.storage, cfg.run_name)
    assert not storage.exists(storage.join(run_dir, "final", "config.yaml")), "the run finished as if it succeeded"
    assert not any(validate_checkpoint(c) for c in list_step_checkpoints(run_dir) if c.endswith("00000002"))
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith(("mplug2-logs-", "mplug2-ckpt-")))
    assert not left, f"a failed run left temp folders behind: {left}"
