"""Checkpoint format: bitwise round trip, per-rank files, manifest-last validity, fallback to the newest valid."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from mplug2 import storage
from mplug2.train.checkpoint import (CheckpointError, find_latest_valid, load_checkpoint, save_checkpoint,
                                     validate_checkpoint)
from mplug2.train.metrics import MetricsLogger, flops_per_sample, plot_curves, recent_means


class TiedLM(nn.Module):
    """Small model with a tied output projection and a buffer (like the decoder head and the ITC queues)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(16))
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("queue", torch.randn(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(x)))


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randint(0, 50, (4, 6))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100)
    return model, opt, sched


def _save(directory, model, opt, sched, step, world_size=2, fingerprint="cfg-a"):
    """Both ranks, rank 1 first (rank 0 waits for every marker before the manifest)."""
    for rank in reversed(range(world_size)):
        save_checkpoint(directory, model=model, optimizer=opt, scheduler=sched, step=step,
                        extra={"queue_ptr": torch.tensor(step % 8)} if rank == 0 else None, rank=rank,
                        world_size=world_size, data_state={"epoch": 1, "batches": step + rank},
                        config_fingerprint=fingerprint, wait_for_ranks_s=5)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_restores_everything_bitwise(tmp_path, request, where):
    directory = str(tmp_path / "ckpt") if where == "local" else request.getfixturevalue("s3_bucket") + "/ckpt"
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    _save(directory, model, opt, sched, step=3)
    assert validate_checkpoint(directory)
    # what an uninterrupted run does next
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    _train(model, opt, sched, 2)

    fresh, fopt, fsched = _setup(seed=99)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    got = load_checkpoint(directory, model=fresh, optimizer=fopt, scheduler=fsched, rank=1, world_size=2,
                          config_fingerprint="cfg-a")
    assert got.step == 3 and got.data_state == {"epoch": 1, "batches": 4}
    assert int(got.extra["queue_ptr"]) == 3
    assert got.manifest["world_size"] == 2 and got.manifest["code"]["torch"] == torch.__version__
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1] and torch.equal(draws[2], expected_draws[2])
    assert fresh.head.weight is fresh.emb.weight, "tied weights must stay tied"
    # continuing training from the restore gives bitwise the same parameters (optimizer + scheduler + RNG)
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    load_checkpoint(directory, model=fresh, optimizer=fopt, scheduler=fsched, rank=0, world_size=2)
    model2, opt2, sched2 = _setup(seed=5)
    load_checkpoint(directory, model=model2, optimizer=opt2, scheduler=sched2, rank=0, world_size=2)
    torch.manual_seed(0)
    _train(fresh, fopt, fsched, 2)
    torch.manual_seed(0)
    _train(model2, opt2, sched2, 2)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert fsched.get_last_lr() == sched2.get_last_lr()
    with pytest.raises(CheckpointError, match="config hash"):
        load_checkpoint(directory, model=fresh, config_fingerprint="cfg-b")


def test_restore_continues_exactly_like_the_uninterrupted_run(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    torch.manual_seed(7)
    _save(str(tmp_path / "c"), model, opt, sched, step=2, world_size=1)
    _train(model, opt, sched, 3)                       # uses dropout RNG restored below
    fresh, fopt, fsched = _setup(seed=1)
    load_checkpoint(str(tmp_path / "c"), model=fresh, optimizer=fopt, scheduler=fsched, rank=0, world_size=1)
    _train(fresh, fopt, fsched, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    for a, b in zip(opt.state_dict()["state"].values(), fopt.state_dict()["state"].values()):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    model, opt, sched = _setup()
    dirs = [str(tmp_path / f"checkpoint_{i}") for i in range(4)]
    for i, d in enumerate(dirs):
        _train(model, opt, sched, 1)
        _save(d, model, opt, sched, step=i + 1)
    assert find_latest_valid(dirs) == dirs[3]
    storage.remove(f"{dirs[3]}/done_rank1.json")                 # a rank died before its marker
    storage.remove(f"{dirs[2]}/manifest.json")                   # rank 0 died before committing
    with open(f"{dirs[1]}/rng_rank0.pt", "ab") as f:            # a file changed after its marker
        f.write(b"x")
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(dirs) == dirs[0]
    text = caplog.text
    assert "done_rank1.json missing" in text and "no manifest.json" in text and "rng_rank0.pt" in text
    assert not validate_checkpoint(dirs[3])
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_checkpoint(dirs[2], model=model)
    assert find_latest_valid([dirs[2]]) is None


def test_rank0_refuses_to_commit_without_all_markers(tmp_path):
    model, opt, sched = _setup()
    with pytest.raises(CheckpointError, match=r"ranks \[1\]"):
        save_checkpoint(str(tmp_path / "c"), model=model, optimizer=opt, scheduler=sched, step=1, extra=None,
                        rank=0, world_size=2, data_state={}, config_fingerprint="x", wait_for_ranks_s=0.5)
    assert not storage.exists(str(tmp_path / "c" / "manifest.json"))


def test_world_size_change_restores_weights_but_not_cursor(tmp_path, caplog):
    model, opt, sched = _setup()
    _save(str(tmp_path / "c"), model, opt, sched, step=1, world_size=2)
    fresh, fopt, _ = _setup(seed=3)
    with caplog.at_level(logging.WARNING):
        got = load_checkpoint(str(tmp_path / "c"), model=fresh, optimizer=fopt, rank=0, world_size=4)
    assert got.data_state is None and "written by 2 ranks" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_recent_means_average_the_last_steps_and_a_resumed_step_counts_once():
    lines = [{"step": s, "itm_acc": 0.5 if s < 8 else 0.9, "loss/itm": 1.0 / s} for s in range(1, 11)]
    lines.insert(9, {"step": 8, "itm_acc": 0.1})          # a resumed run logged step 8 again: the last wins
    lines.append({"step": 10, "eval/img_r1": 30.0})       # an evaluation record of the same step
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    got = recent_means(text, ("itm_acc", "loss/itm", "missing"), last=3)
    assert got["itm_acc"] == pytest.approx((0.1 + 0.9 + 0.9) / 3)
    assert got["loss/itm"] == pytest.approx((1 / 8 + 1 / 9 + 1 / 10) / 3)
    assert "missing" not in got


def test_metrics_logger_writes_tensorboard_jsonl_and_plots(tmp_path):
    model, opt, sched = _setup()
    fps = flops_per_sample(lambda: model(torch.randint(0, 50, (4, 6))).sum().backward(), batch_size=4)
    assert fps > 3 * 2 * 6 * 16 * 16            # at least the first linear layer's fwd + bwd
    with MetricsLogger(str(tmp_path / "tb"), flops_per_sample=1e9, peak_flops=1e12, num_devices=2) as ml:
        for step in range(1, 6):
            out = ml.log_step(step, {"loss/itc": 1.0 / step, "lr": 1e-4, "step_time_s": 0.5, "data_wait_s": 0.1,
                                     "ckpt_wait_s": 0.0}, samples=64)
    assert out["samples_per_s"] == 128 and out["samples_per_s_per_device"] == 64
    assert out["data_wait_frac"] == pytest.approx(0.2) and out["mfu"] == pytest.approx(64 * 1e9 / 1e12)
    rows = [json.loads(l) for l in open(tmp_path / "tb" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss/itc"] == pytest.approx(0.2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    keys = plot_curves(str(tmp_path / "tb" / "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert "loss/itc" in keys and (tmp_path / "curves.png").stat().st_size > 5000
    assert MetricsLogger(str(tmp_path / "other"), rank=1).log_step(1, {"lr": 1.0}) == {}
    assert not (tmp_path / "other").exists()
