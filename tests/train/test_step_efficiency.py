"""GPU-scale training features, exercised on CPU: a bf16-autocast run logs achieved TFLOP/s and MFU to
TensorBoard, uploads checkpoints in the background and keeps exactly ``keep_last`` valid ones on S3; compiled
blocks train to the same losses as eager ones; upload errors surface in the training process. Checkpoints off
the critical path: the step copies the state into shared memory, a writer process writes it and a background
thread uploads it; the copy is the state of its step even when written after training moved on, one
checkpoint is in flight at most, the run returns only once the last one is on storage, and a run (failed or
not) leaves no temp folders and no writer process behind."""

from __future__ import annotations

import multiprocessing
import tempfile
import threading

import pytest
import torch

from mplug2 import storage
from mplug2.train import hooks as hooks_mod
from mplug2.train import loop as loop_mod
from mplug2.train.checkpoint import STEP_PREFIX, list_step_checkpoints, read_model_tensors, validate_checkpoint
from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local
from mplug2.train.uploader import BackgroundUploader
from tests.data.shards_fixture import write_shards

STEPS, KEEP = 5, 2
WAIT_S = 120       # an upper bound on waiting for an event, only reached when the code under test is broken


def _cfg(shards: str, storage_url: str, name: str, **scale) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        run_name=name, storage=storage_url, task="pretrain", seed=3,
        # the fixture's captions differ by their digits, which the tiny vocabulary maps to [UNK]
        model={"preset": "tiny", "queue_size": 16, "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}},
        data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=4, shuffle_buffer=8,
                  shards_in_flight=2, max_text_len=12),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=1),
        schedule=dict(total_steps=STEPS, ckpt_every_steps=1, log_every_steps=1, keep_last=KEEP),
        scale=dict(num_workers=1, **scale),
    ))


def _writer_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "mplug2-ckpt-writer"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core box: more threads only add hand-offs (bf16 on CPU: 20x slower)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("eff") / "images")
    write_shards(prefix, [16, 16], size=(40, 36))
    return prefix


@pytest.fixture(scope="module")
def bf16_run(shards, s3_server, tmp_path_factory):
    """One tiny bf16 run on S3 storage, a checkpoint every step: (config, metrics of the last step)."""
    cfg = _cfg(shards, "s3://mplug2/eff-runs", "bf16", precision="bf16", peak_tflops=0.5)
    last = run_local(cfg)
    return cfg, last


def test_bf16_autocast_steps_train(bf16_run):
    cfg, last = bf16_run
    assert cfg.scale.precision == "bf16"
    assert torch.isfinite(torch.tensor(last["loss/loss"])), last


def test_keep_last_leaves_exactly_n_valid_checkpoints_on_s3(bf16_run):
    cfg, _ = bf16_run
    found = list_step_checkpoints(storage.join(cfg.storage, cfg.run_name))
    assert [int(c.rsplit("_", 1)[1]) for c in found] == list(range(STEPS - KEEP + 1, STEPS + 1)), found
    assert all(validate_checkpoint(c) for c in found)


def test_tensorboard_holds_mfu_and_tflops(bf16_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, last = bf16_run
    logs = storage.join(cfg.storage, cfg.run_name, "logs")
    events = [n for n in storage.list_names(logs) if n.startswith("events.out.tfevents")]
    assert events, storage.list_names(logs)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for n in events:
            storage.download_file(storage.join(logs, n), f"{tmp}/{n}")
        acc = EventAccumulator(tmp)
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
    assert {"mfu", "tflops", "samples_per_s", "data_wait_s"} <= tags, tags
    # MFU is achieved TFLOP/s over the configured peak
    assert last["tflops"] > 0 and last["mfu"] == pytest.approx(last["tflops"] / 0.5)


def test_training_continues_while_a_checkpoint_upload_is_blocked(shards, tmp_path, monkeypatch):
    """The step-2 upload waits on an event that only step 3 sets: the run can finish only if training went on
    while the upload was in flight; the next save then waits for it (one upload at a time, in order)."""
    gate, order = threading.Event(), []
    real_upload = hooks_mod.upload_checkpoint

    def gated_upload(local: str, dest: str):
        step = int(dest.rsplit("_", 1)[1])
        if step == 2:
            assert gate.wait(120), "training never reached step 3 while the step-2 upload was blocked"
        order.append(step)
        return real_upload(local, dest)

    real_step = loop_mod.TrainLoop.train_step

    def train_step(self):
        out = real_step(self)
        if self.step == 3:
            order.append("step3")
            gate.set()
        return out

    monkeypatch.setattr(hooks_mod, "upload_checkpoint", gated_upload)
    monkeypatch.setattr(loop_mod.TrainLoop, "train_step", train_step)
    cfg = _cfg(shards, str(tmp_path), "gated")
    cfg.schedule.total_steps, cfg.schedule.ckpt_every_steps, cfg.schedule.keep_last = 4, 2, 5
    run_local(cfg)
    assert order == ["step3", 2, 4], order
    assert not _writer_processes(), "the run left its checkpoint writer process running"
    assert [validate_checkpoint(c) for c in list_step_checkpoints(str(tmp_path / "gated"))] == [True, True]


def test_background_upload_error_surfaces_in_the_training_thread():
    """The uploader re-raises a failed upload's own exception: at once when asked without blocking (the check
    after every step), and at the next submit; one upload at a time, the next waits for the previous."""
    release, started = threading.Event(), threading.Event()
    uploader = BackgroundUploader()

    def slow():
        started.set()
        assert release.wait(60)

    def failing():
        raise OSError("disk full while uploading step_00000002")

    uploader.submit(slow, "step_00000001")
    assert started.wait(60) and uploader.busy
    uploader.wait(block=False)                  # still running: returns at once, nothing to raise
    release.set()
    uploader.submit(failing, "step_00000002")   # waits for step 1 first
    assert uploader._idle.wait(60)          # the failed upload has ended
    with pytest.raises(OSError, match="disk full while uploading step_00000002"):
        uploader.wait(block=False)
    uploader.submit(lambda: None, "step_00000003")
    uploader.wait()
    with pytest.raises(OSError, match="step_00000004"):
        uploader.submit(lambda: (_ for _ in ()).throw(OSError("step_00000004")), "step_00000004")
        uploader.submit(lambda: None, "step_00000005")


def test_snapshot_holds_its_step_one_in_flight_and_the_run_waits_for_the_last(shards, tmp_path, monkeypatch):
    """Checkpoints at steps 2 and 4. The step-2 write waits until step 3 has trained (so the live weights
    moved on before it serialised); the step-4 one waits until the run's closing wait has begun."""
    after_step: dict[int, dict[str, torch.Tensor]] = {}
    trained3, closing = threading.Event(), threading.Event()
    lock, active, max_active, events = threading.Lock(), [0], [0], []
    real_job, real_step = hooks_mod.write_and_upload, loop_mod.TrainLoop.train_step
    real_wait, real_report = loop_mod.LocalHooks.wait_for_upload, loop_mod.LocalHooks.report

    def job(checkpoint, upload):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        try:
            if checkpoint.step == 2:
                assert trained3.wait(WAIT_S), "training never reached step 3 while step 2 was being checkpointed"
            if checkpoint.step == 4:
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
        if block and events and events[-1] == "reported 4":      # the wait after the last step
            events.append("closing wait")
            closing.set()
        return real_wait(self, block)

    monkeypatch.setattr(hooks_mod, "write_and_upload", job)
    monkeypatch.setattr(loop_mod.TrainLoop, "train_step", train_step)
    monkeypatch.setattr(loop_mod.LocalHooks, "report", report)
    monkeypatch.setattr(loop_mod.LocalHooks, "wait_for_upload", wait_for_upload)
    cfg = _cfg(shards, str(tmp_path), "async")
    cfg.schedule.total_steps, cfg.schedule.ckpt_every_steps, cfg.schedule.keep_last = 4, 2, 10
    run_local(cfg)
    events.append("returned")

    assert max_active[0] == 1, "two checkpoints were in flight at once"
    assert events.index("reported 4") > events.index("written 2"), events   # step 4 waited for step 2
    assert events[-3:] == ["closing wait", "written 4", "returned"], events
    run_dir = storage.join(cfg.storage, cfg.run_name)
    found = list_step_checkpoints(run_dir)
    assert [int(c.rsplit("_", 1)[1]) for c in found] == [2, 4] and all(validate_checkpoint(c) for c in found)
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
    real_upload = hooks_mod.upload_checkpoint

    def upload(local: str, dest: str):
        if dest.endswith(f"{STEP_PREFIX}{2:08d}"):
            raise OSError("disk quota exceeded while uploading step 2")
        return real_upload(local, dest)

    monkeypatch.setattr(hooks_mod, "upload_checkpoint", upload)
    cfg = _cfg(shards, s3_bucket, "fails")
    cfg.schedule.total_steps, cfg.schedule.ckpt_every_steps = 4, 2
    with pytest.raises(OSError, match="disk quota exceeded while uploading step 2"):
        run_local(cfg)
    run_dir = storage.join(cfg.storage, cfg.run_name)
    assert not storage.exists(storage.join(run_dir, "final", "config.yaml")), "the run finished as if it succeeded"
    assert not any(validate_checkpoint(c) for c in list_step_checkpoints(run_dir) if c.endswith("00000002"))
    left = sorted(p.name for p in scratch.iterdir() if p.name.startswith(("mplug2-logs-", "mplug2-ckpt-")))
    assert not left, f"a failed run left temp folders behind: {left}"
    assert not _writer_processes(), "a failed run left its checkpoint writer process running"
