"""ITC under two gloo ranks equals one process on the concatenated batch (loss, DDP gradients, queues).

Both modes from training-and-ops §3.1: queue mode (momentum keys gathered without gradient, same enqueue on
every rank) and no-queue mode (online keys gathered with gradient). Swapping in a plain ``dist.all_gather``
must break the no-queue gradients; the test asserts that explicitly.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import mplug2.objectives.itc as itc_mod
from mplug2.objectives.itc import ITCConfig, ITCHead
from mplug2.objectives.momentum import MomentumPairs
from mplug2.runtime import free_loopback_port

WORLD, LOCAL_B, IN, WIDTH, EMB, QUEUE = 2, 4, 8, 12, 6, 16
MODES = {  # name -> (queue_size, use ids ("text": item ids and caption ids), alpha, plain all_gather)
    "queue": (QUEUE, False, 0.4, False),
    "queue_caption_ids": (QUEUE, "text", 0.4, False),   # captions repeated across ranks: positives there too
    "queue_ids": (QUEUE, True, 0.4, False),
    "noqueue": (0, False, 0.0, False),
    "noqueue_distill": (0, True, 0.4, False),
    "noqueue_plain_gather": (0, False, 0.0, True),
}


class Toy(nn.Module):
    """Two linear 'encoders', the ITC head and momentum twins of all four trainable parts."""

    def __init__(self, queue_size: int):
        super().__init__()
        torch.manual_seed(0)
        self.vis, self.txt = nn.Linear(IN, WIDTH), nn.Linear(IN, WIDTH)
        self.itc = ITCHead(ITCConfig(width=WIDTH, embed_dim=EMB, queue_size=queue_size, temp=0.1))
        self.mom = MomentumPairs({"vis": self.vis, "txt": self.txt, "vproj": self.itc.vision_proj,
                                  "tproj": self.itc.text_proj}, momentum=0.5)
        with torch.no_grad():  # make the online model differ from its twins
            for p in [*self.vis.parameters(), *self.txt.parameters()]:
                p.add_(0.3 * torch.randn_like(p))

    def forward(self, xv, xt, ids, alpha, text_ids=None):
        f_v = self.itc.embed_vision(self.vis(xv))
        f_t = self.itc.embed_text(self.txt(xt))
        with torch.no_grad():
            f_v_m = F.normalize(self.mom["vproj"](self.mom["vis"](xv)), dim=-1)
            f_t_m = F.normalize(self.mom["tproj"](self.mom["txt"](xt)), dim=-1)
        return self.itc(f_v, f_t, f_v_m, f_t_m, ids=ids, alpha=alpha, text_ids=text_ids).loss


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    b = WORLD * LOCAL_B
    return (torch.randn(b, IN, generator=g), torch.randn(b, IN, generator=g), torch.tensor([0, 1, 2, 0, 3, 4, 5, 3]),
            torch.tensor([10, 11, 12, 13, 10, 14, 15, 11]))   # caption ids: rank 0's 10 and 11 recur on rank 1


def _run(model_call, params, queue_of, rank: int | None):
    """Two steps; per step: loss, gradients (then zeroed), queue state."""
    out = []
    for step in range(2):
        xv, xt, ids, tids = _data(step)
        if rank is not None:
            sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            xv, xt, ids, tids = xv[sl], xt[sl], ids[sl], tids[sl]
        loss = model_call(xv, xt, ids, tids)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params()]
        for p in params():
            p.grad = None
        out.append({"loss": loss.detach().clone(), "grads": grads, "queue": queue_of()})
    return out


def _queues(head: ITCHead):
    if not head.use_queue:
        return None
    return [head.vision_queue.clone(), head.text_queue.clone(), head.idx_queue.clone(), head.text_idx_queue.clone(),
            head.queue_ptr.clone()]


def _worker(rank: int, port: int, results: dict):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rank_out = {}
        for name, (q, use_ids, alpha, plain) in MODES.items():
            if plain:
                def plain_gather(x):
                    bufs = [torch.empty_like(x) for _ in range(WORLD)]
                    dist.all_gather(bufs, x.contiguous())
                    bufs[rank] = x  # keep local autograd history, like a careful but wrong implementation
                    return torch.cat(bufs)
                itc_mod.gather_with_grad = plain_gather
            toy = Toy(q)
            ddp = nn.parallel.DistributedDataParallel(toy, forward_sync_buffers=False)

            def call(xv, xt, ids, tids, _ddp=ddp, _u=use_ids, _a=alpha):
                if _u == "text":
                    return _ddp(xv, xt, torch.arange(len(ids)) + 100 * rank, _a, tids)
                return _ddp(xv, xt, ids if _u else None, _a)
            steps = _run(call, lambda: [p for p in toy.parameters() if p.requires_grad],
                         lambda: _queues(toy.itc), rank)
            for s in steps:  # mean of rank losses
                dist.all_reduce(s["loss"])
                s["loss"] /= WORLD
            rank_out[name] = steps
        results[rank] = rank_out
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def dist_results():
    with mp.get_context("spawn").Manager() as manager:   # not fork: the session holds a Ray driver
        results = manager.dict()
        mp.spawn(_worker, args=(free_loopback_port(), results), nprocs=WORLD, join=True)
        return {r: results[r] for r in range(WORLD)}


@pytest.mark.parametrize("mode", [m for m in MODES if not MODES[m][3]])
def test_two_ranks_equal_single_process(mode, dist_results):
    q, use_ids, alpha, _ = MODES[mode]
    toy = Toy(q)
    def call(xv, xt, ids, tids):
        if use_ids == "text":       # distinct item ids (as rank r numbers them), repeated captions
            return toy(xv, xt, torch.cat([torch.arange(LOCAL_B) + 100 * r for r in range(WORLD)]), alpha, tids)
        return toy(xv, xt, ids if use_ids else None, alpha)
    single = _run(call,
                  lambda: [p for p in toy.parameters() if p.requires_grad], lambda: _queues(toy.itc), None)
    for rank in range(WORLD):
        for step, (s, d) in enumerate(zip(single, dist_results[rank][mode])):
            torch.testing.assert_close(d["loss"], s["loss"], rtol=1e-5, atol=1e-6)
            assert len(d["grads"]) == len(s["grads"]) == 9  # 4 linears (weight, bias) + temperature
            for gd, gs in zip(d["grads"], s["grads"]):
                torch.testing.assert_close(gd, gs, rtol=1e-4, atol=1e-6)
            if q:
                for a, b in zip(d["queue"], s["queue"]):
                    torch.testing.assert_close(a, b)
                for a, b in zip(d["queue"], dist_results[1 - rank][mode][step]["queue"]):
                    assert torch.equal(a, b)  # identical queues across ranks


def test_plain_all_gather_breaks_no_queue_gradients(dist_results):
    toy = Toy(0)
    single = _run(lambda xv, xt, ids, tids: toy(xv, xt, None, 0.0),
                  lambda: [p for p in toy.parameters() if p.requires_grad], lambda: None, None)
    d = dist_results[0]["noqueue_plain_gather"]
    # the loss value itself is right (forward is the same) ...
    torch.testing.assert_close(d[0]["loss"], single[0]["loss"], rtol=1e-5, atol=1e-6)
    # ... but gradients from the other rank's queries to local keys are lost
    worst = max((gd - gs).abs().max().item() for gd, gs in zip(d[0]["grads"], single[0]["grads"]))
    assert worst > 1e-3, "plain all_gather unexpectedly matched the reference gradients"
