"""Evaluation that scales: with two gloo ranks each scores its half of the eval corpus, the pieces are
gathered, and every rank reports exactly the numbers one process reports on the whole corpus."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.runtime import free_loopback_port
from mplug2.tokenizer import load_tokenizer
from mplug2.train.config import TrainConfig
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks import EvalContext, get_task
from tests.tiny import one_thread  # noqa: F401  (fixture)

WORLD, N = 2, 9            # an odd count: the ranks' slices differ in size
TASKS = {"retrieval": {}, "caption": {}, "qa": {}, "classify": {"classes": ["a", "b", "c"]}}
CALIBRATED = "retrieval-calibrated"     # the re-rank's ITM weight chosen on a validation corpus first
TASKS[CALIBRATED] = {}


def _data() -> EvalSet:
    g = torch.Generator().manual_seed(0)
    words = "a red blue circle square moving left right up down".split()
    caps = [[" ".join(words[(i * 3 + j) % 10] for j in range(4))] + ([f"{words[i % 10]} clip"] if i % 3 == 0 else [])
            for i in range(N)]
    return EvalSet(keys=[f"k{i}" for i in range(N)], pixels=torch.randn(N, 3, 2, 32, 32, generator=g), captions=caps,
                   answers=[words[i % 4] for i in range(N)], labels=["abc"[i % 3] for i in range(N)])


def _scores(name: str, data: EvalSet) -> dict[str, float]:
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    task_name = "retrieval" if name == CALIBRATED else name
    cfg = TrainConfig(run_name="e", task=task_name, model="tiny", **TASKS[name])
    spec = get_task(task_name)
    task = spec.build(cfg, MPLUG2(MPLUG2Config.preset("tiny")), tok, 1).eval()
    ctx = EvalContext(tok, max_text_len=12, batch_size=4, options=cfg.options)
    with torch.no_grad():
        chosen = spec.calibrate(task, data, ctx) if name == CALIBRATED else {}
        return {**spec.evaluate(task, data, ctx), **chosen}


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mine = _data().shard(rank, WORLD)
        results[rank] = {"items": len(mine.keys), **{t: _scores(t, mine) for t in TASKS}}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded():
    with mp.get_context("spawn").Manager() as manager:   # not fork: the session holds a Ray driver
        results = manager.dict()
        mp.spawn(_worker, args=(free_loopback_port(), results), nprocs=WORLD, join=True)
        return {r: dict(results[r]) for r in range(WORLD)}


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_two_ranks_report_the_single_process_numbers(task_name, sharded, one_thread):
    single = _scores(task_name, _data())
    assert [sharded[r]["items"] for r in range(WORLD)] == [5, 4]    # each rank holds only its slice
    for r in range(WORLD):
        assert sharded[r][task_name].keys() == single.keys()
        for k, v in single.items():
            assert sharded[r][task_name][k] == pytest.approx(v, abs=1e-4), (task_name, k)
