"""The checkpoint writer process: snapshots whose tensors sit in shared staging buffers are written by another
process (the serialisers hold the GIL, which would stall the training thread); each file holds the state of
its own step though the buffers are reused; the writer's error is raised in the caller with its own type; a
writer that died is a clear error and the next checkpoint gets a fresh one; close leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from mplug2.train.checkpoint import CheckpointError, StagingBuffers, read_model_tensors, take_snapshot, \
    validate_checkpoint
from mplug2.train.checkpoint.layout import TRAINER_FILE
from mplug2.train.checkpoint.writer import SnapshotWriter


@pytest.fixture()
def trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def _snapshot(directory, model, optimizer, step: int, buffers: StagingBuffers, writer: SnapshotWriter | None):
    snap = take_snapshot(str(directory), model=model, optimizer=optimizer, scheduler=None, step=step,
                         extra={"best": 0.5}, rank=0, world_size=1, data_state={"cursor": step},
                         config_fingerprint={"run": "w"}, buffers=buffers, write_manifest=True)
    snap.writer = writer.write if writer is not None else None
    return snap


def test_writer_process_writes_each_step_and_raises_its_errors(trained, tmp_path):
    model, optimizer = trained
    buffers = StagingBuffers(shared=True)
    writer = SnapshotWriter(buffers)
    try:
        expected = {}
        for step in (1, 2):
            snap = _snapshot(tmp_path / f"s{step}", model, optimizer, step, buffers, writer)
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                model[0].weight.add_(1.0)          # training moves on before the files are written
            assert "manifest.json" in snap.write() and snap.written_s is not None and snap.written_cpu_s > 0
            assert validate_checkpoint(str(tmp_path / f"s{step}"))
            saved = read_model_tensors(str(tmp_path / f"s{step}"))
            assert all(torch.equal(saved[k], v) for k, v in expected[step].items()), step
        pid = writer.pid
        assert pid is not None and pid != os.getpid()
        (tmp_path / "a-file").write_text("not a folder")
        bad = _snapshot(tmp_path / "a-file", model, optimizer, 3, buffers, writer)
        with pytest.raises(OSError):               # the writer's own exception type, raised here
            bad.write()
        _snapshot(tmp_path / "s4", model, optimizer, 4, buffers, writer).write()
        assert writer.pid == pid and validate_checkpoint(str(tmp_path / "s4"))   # one process per run
    finally:
        writer.close()
    with pytest.raises(OSError):
        os.kill(pid, 0)                            # stopped and reaped: no process left behind
    with pytest.raises(CheckpointError, match="closed"):
        _snapshot(tmp_path / "s5", model, optimizer, 5, buffers, writer).write()


def test_trainer_state_holds_the_optimizer_state_bytes_not_the_shared_segments(trained, tmp_path):
    """The staging buffers are carved from shared segments of 8 MiB and more; ``torch.save`` writes a tensor's
    whole storage, so a writer that saw plain views of a segment wrote all of it into ``trainer_state.pt``. The
    same holds when the training process writes the snapshot itself."""
    model, optimizer = trained
    buffers = StagingBuffers(shared=True)
    writer = SnapshotWriter(buffers)
    try:
        _snapshot(tmp_path / "s1", model, optimizer, 1, buffers, writer).write()
    finally:
        writer.close()
    _snapshot(tmp_path / "s2", model, optimizer, 2, buffers, writer).write_here()   # a daemonic process's way
    state_bytes = sum(t.numel() * t.element_size() for entry in optimizer.state.values() for t in entry.values())
    expected = optimizer.state_dict()["state"]
    for folder in ("s1", "s2"):
        size = os.path.getsize(tmp_path / folder / TRAINER_FILE)
        assert state_bytes < size < state_bytes + (64 << 10), (folder, size, state_bytes)
        saved = torch.load(tmp_path / folder / TRAINER_FILE, weights_only=True)["optimizer"]["state"]
        assert all(torch.equal(saved[i][k], v) for i, entry in expected.items() for k, v in entry.items()), folder


def test_the_writer_keeps_the_plans_structures_and_gets_a_changed_one(trained, tmp_path):
    """After the first hand-off the model's and the optimizer's staged structures go as keys (the writer holds
    them); a model that changed (a new module: a new plan) sends its new structure, and the files hold it."""
    import dataclasses

    from mplug2.train.checkpoint.writer import _dumps

    model, optimizer = trained
    buffers = StagingBuffers(shared=True)
    first = _snapshot(tmp_path / "probe1", model, optimizer, 1, buffers, None)
    payload, new, held = _dumps(dataclasses.replace(first, writer=None), buffers)
    assert len(new) == 2 and held == frozenset(new)                 # the model's dict, the optimizer's state
    again = _snapshot(tmp_path / "probe2", model, optimizer, 2, buffers, None)
    payload2, new2, held2 = _dumps(dataclasses.replace(again, writer=None), buffers, held)
    assert new2 == {} and held2 == held and len(payload2) < len(payload) + sum(map(len, new.values())) / 4

    writer = SnapshotWriter(buffers)
    try:
        for step in (1, 2, 3):
            if step == 3:
                model.append(torch.nn.Linear(3, 2))                 # a new plan, a new structure
            _snapshot(tmp_path / f"s{step}", model, optimizer, step, buffers, writer).write()
            saved = read_model_tensors(str(tmp_path / f"s{step}"))
            assert saved.keys() == model.state_dict().keys(), step
            assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), step
            with torch.no_grad():
                model[0].weight.add_(1.0)
    finally:
        writer.close()


def test_a_dead_writer_is_a_clear_error_and_the_next_checkpoint_gets_a_new_one(trained, tmp_path):
    model, optimizer = trained
    buffers = StagingBuffers(shared=True)
    writer = SnapshotWriter(buffers)
    try:
        _snapshot(tmp_path / "s1", model, optimizer, 1, buffers, writer).write()
        first = writer.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(CheckpointError, match=rf"writer process died \(pid {first} killed by SIGKILL\)"):
            _snapshot(tmp_path / "s2", model, optimizer, 2, buffers, writer).write()
        _snapshot(tmp_path / "s3", model, optimizer, 3, buffers, writer).write()   # every buffer sent again
        assert writer.pid != first and validate_checkpoint(str(tmp_path / "s3"))
        saved = read_model_tensors(str(tmp_path / "s3"))
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    finally:
        writer.close()


def test_payload_is_fsynced_unless_the_folder_is_a_staging_copy(trained, tmp_path, monkeypatch):
    """A checkpoint written where it stays survives a crash (every file fsynced before it is renamed into
    place); the training loop's staging folder, uploaded and deleted, costs no fsync of its payload."""
    model, optimizer = trained
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    for durable in (True, False):
        synced.clear()
        snap = take_snapshot(str(tmp_path / str(durable)), model=model, optimizer=optimizer, scheduler=None, step=1,
                             extra=None, rank=0, world_size=1, data_state={"cursor": 1}, config_fingerprint="d",
                             write_manifest=True)
        snap.durable = durable
        written = snap.write()
        assert validate_checkpoint(str(tmp_path / str(durable))) and snap.written_cpu_s is not None
        payload = {n for n in written if n != "manifest.json"}
        fsynced = {os.path.basename(p).split(".partial")[0] for p in synced}
        assert fsynced >= payload if durable else not fsynced & payload, (durable, fsynced)


def test_overlapped_snapshot_copies_buffers_now_and_weights_beside_the_next_step(tmp_path, monkeypatch):
    """``overlap``: a buffer (changed by the next forward pass) is copied before take_snapshot returns; weights
    and AdamW state are copied in a thread while training goes on, and the files hold the snapshot's step."""
    import threading

    from mplug2.train.checkpoint import staging as staging_mod

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    release, real_run = threading.Event(), staging_mod.BackgroundCopy._run

    def gated_run(self, dsts, srcs):
        assert release.wait(60), "the test never released the background copy"
        real_run(self, dsts, srcs)

    monkeypatch.setattr(staging_mod.BackgroundCopy, "_run", gated_run)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    snap = take_snapshot(str(tmp_path / "s1"), model=model, optimizer=optimizer, scheduler=None, step=1, extra={},
                         rank=0, world_size=1, data_state={"cursor": 1}, config_fingerprint={"run": "o"},
                         buffers=StagingBuffers(), write_manifest=True, overlap=True)
    assert snap.staged is not None                      # the weights' copy is still waiting
    model(torch.randn(4, 16))                            # the next forward pass: BatchNorm's running stats move
    release.set()
    snap.wait_staged()                                   # what the loop does before its optimizer step
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    snap.write()
    saved = read_model_tensors(str(tmp_path / "s1"))
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    trainer = torch.load(tmp_path / "s1" / "trainer_state.pt", weights_only=True)
    state = trainer["optimizer"]["state"][0]
    assert all(torch.equal(state[k], v) for k, v in adam.items())


def test_staging_snapshot_whose_folder_is_gone_fails_and_makes_no_folder(trained, tmp_path):
    """A worker's staging folder lives under the run's scratch folder, which the driver removes when the run ends,
    also when a worker died while another's writer was still busy: that write fails instead of making the folders
    again (they would be left in /tmp, where nothing removes them)."""
    model, optimizer = trained
    scratch = tmp_path / "mplug2-scratch-run"
    stage = scratch / "worker-0" / "mplug2-ckpt-0"
    stage.mkdir(parents=True)
    snap = take_snapshot(str(stage), model=model, optimizer=optimizer, scheduler=None, step=1, extra=None, rank=0,
                         world_size=1, data_state={"cursor": 1}, config_fingerprint="d", write_manifest=True)
    snap.durable, snap.make_dirs = False, False
    shutil.rmtree(scratch)
    with pytest.raises(OSError):
        snap.write()
    assert not scratch.exists()


def test_tensors_outside_the_staging_buffers_go_to_the_writer_by_value():
    """RNG states and other small tensors travel inside the message (no shared-memory segment and no
    file-descriptor hand-off per checkpoint); staged tensors travel as their buffers' keys."""
    import io

    from mplug2.train.checkpoint.writer import _RefPickler, _RefUnpickler

    buffers = StagingBuffers(shared=True)
    staged = buffers.copy("model/w", torch.arange(6.0))
    buffers.flush()
    loose = {"rng": torch.randint(0, 255, (5056,), dtype=torch.uint8),
             "scalar": torch.tensor(3.5, dtype=torch.bfloat16), "empty": torch.zeros(0, 4),
             "strided": torch.arange(12).reshape(3, 4).t(),
             "keys": torch.tensor([1, 2**31 + 5, 7], dtype=torch.int64).to(torch.uint32)}   # numpy's RNG keys
    out = io.BytesIO()
    _RefPickler(out, buffers).dump({"staged": staged, **loose})
    got = _RefUnpickler(io.BytesIO(out.getvalue()), {"model/w": staged}).load()
    assert got["staged"] is staged
    for name, t in loose.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert not got[name].is_shared(), name
