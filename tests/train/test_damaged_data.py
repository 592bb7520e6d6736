"""Training survives damaged shards: unreadable samples are skipped, counted (metrics, loader state, run
summary), the run fails only past ``data.max_bad_samples``, and a resume stays bitwise exact."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from mplug2.data.damage import DamagedDataError
from mplug2.data.dataset_index import load_index
from mplug2.data.loader import LoaderConfig, build_loader
from mplug2.data.stream import CorpusStream, StreamConfig
from mplug2.train.checkpoint import find_latest_valid, list_step_checkpoints, read_model_tensors
from mplug2.train.config import TrainConfig
from mplug2.train.loop import TrainLoop, run_local
from tests.data.shards_fixture import write_shards

STEPS, EVERY = 4, 2


def _damage(prefix: str) -> list[str]:
    """Truncate the first shard the training run reads (mid-tar) and replace the second by garbage of the
    same size, so the bad data is met before the first checkpoint; returns their names."""
    order = CorpusStream(load_index(prefix), "images", StreamConfig(batch_size=4, seed=5), rank=0,
                         world_size=1).shard_order(0)
    t1, t3 = os.path.join(prefix, order[0]), os.path.join(prefix, order[1])
    data = open(t1, "rb").read()
    open(t1, "wb").write(data[: len(data) // 2 + 100])
    size = os.path.getsize(t3)
    open(t3, "wb").write(bytes((i * 37 + 11) % 251 for i in range(size)))
    return order[:2]


@pytest.fixture
def damaged(tmp_path):
    prefix = str(tmp_path / "shards")
    write_shards(prefix, [8] * 6, size=(40, 32))
    return prefix, _damage(prefix)


def _cfg(shards: str, storage_dir: str, name: str, **data) -> TrainConfig:
    return TrainConfig.from_dict(dict(
        run_name=name, storage=storage_dir, task="pretrain", seed=5,
        # the fixture's captions differ by their digits, which the tiny vocabulary maps to [UNK]: with every
        # caption the same, ITM would have no negative (same-caption pairs are never negatives)
        model={"preset": "tiny", "queue_size": 16, "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522}},
        # two shards in flight: the 4 steps read both bad shards past the truncation point
        data=dict(train=[dict(name="images", path=shards, num_frames=1)], batch_size=4, shuffle_buffer=8,
                  shards_in_flight=2, max_text_len=16, read_attempts=1, **data),
        optim=dict(lr=5e-4, lr_vision=5e-4, warmup_steps=2),
        schedule=dict(total_steps=STEPS, ckpt_every_steps=EVERY, log_every_steps=1, keep_last=10),
        scale=dict(num_workers=1), debug=dict(deterministic=True),
    ))


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_run_over_damaged_shards_finishes_reports_and_resumes_bitwise(damaged, tmp_path, monkeypatch, caplog):
    damaged, bad = damaged
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = str(tmp_path / "runs")
    with caplog.at_level(logging.WARNING):
        last = run_local(_cfg(damaged, runs, "whole"))
    assert last["data/damaged_samples"] > 0
    report = [r.getMessage() for r in caplog.records if "damaged training data skipped" in r.getMessage()]
    assert report and bad[0] in report[0] and bad[1] in report[0]
    metrics = [json.loads(x) for x in open(os.path.join(runs, "whole", "logs", "metrics.jsonl"))]
    assert metrics[-1]["data/damaged_samples"] == last["data/damaged_samples"]

    # The same run, stopped right after the checkpoint at step EVERY (taken after the bad shards were met),
    # then resumed: bitwise the uninterrupted run's weights.
    orig = TrainLoop._inject_fault

    def stop_after_checkpoint(self):
        if self.step == EVERY + 1:
            raise _Stop()
        orig(self)

    monkeypatch.setattr(TrainLoop, "_inject_fault", stop_after_checkpoint)
    with pytest.raises(_Stop):
        run_local(_cfg(damaged, runs, "cut"))
    monkeypatch.setattr(TrainLoop, "_inject_fault", orig)
    ckpt = find_latest_valid(list_step_checkpoints(os.path.join(runs, "cut")))
    state = json.load(open(os.path.join(ckpt, "data_rank0.json")))
    assert set(bad) & set(json.dumps(state).split('"')), "the checkpoint must come after damaged data was met"
    run_local(_cfg(damaged, runs, "cut"))
    a = read_model_tensors(find_latest_valid(list_step_checkpoints(os.path.join(runs, "whole"))))
    b = read_model_tensors(find_latest_valid(list_step_checkpoints(os.path.join(runs, "cut"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_fails_past_the_budget_naming_the_shards(damaged):
    damaged, bad = damaged
    loader = build_loader(LoaderConfig(prefix=damaged, corpus="c", batch_size=4, num_workers=0, shuffle_buffer=8,
                                       read_attempts=1, max_bad_samples=3, tokenizer="tiny"))
    with pytest.raises(DamagedDataError, match=r"past data.max_bad_samples=3. Damaged shards: train-\d+\.tar"):
        for _ in range(12):
            next(loader)


def test_loader_state_counts_skipped_samples_and_resumes_exactly(damaged):
    damaged, bad = damaged
    cfg = LoaderConfig(prefix=damaged, corpus="c", batch_size=4, num_workers=0, shuffle_buffer=8, read_attempts=1,
                       tokenizer="tiny", train=False)
    full = build_loader(cfg)
    batches = [next(full) for _ in range(10)]
    assert full.damage.total > 0 and set(full.damage.shards) <= set(bad)
    cut = build_loader(cfg)
    for _ in range(5):
        next(cut)
    state = cut.state_dict()
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(5)]
    assert resumed.damage.total == full.damage.total
    for a, b in zip(batches[5:], rest):
        assert a["keys"] == b["keys"] and torch.equal(a["pixels"], b["pixels"])
    assert len(load_index(damaged).shards) == 6
