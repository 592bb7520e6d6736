"""Retrieval (text <-> video / image): ITC ranks everything, ITM re-ranks each query's top-k; R@1/5/10 both
ways, the ITC-only recalls beside them, and ITM on held-out hard pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather, rank_and_world


@dataclass
class RetrievalOptions:
    k_test: int = 16                # ITM re-ranks each query's top-k ITC candidates (128/256 at scale)

    def __post_init__(self) -> None:
        if self.k_test < 1:
            raise ValueError(f"task_options.k_test must be >= 1, got {self.k_test}")


def _build_retrieval(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.retrieval import RetrievalConfig, Retriever

    return Retriever(model, tokenizer, RetrievalConfig(
        global_batch=cfg.data.batch_size * world_size, itm_weight=cfg.loss_weights.get("itm", 1.0)))


def _evaluate_retrieval(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Each rank encodes its items and their texts; features are gathered; each rank re-ranks the queries
    of its own items; the re-ranked rows are gathered; every rank computes the same recalls."""
    from mplug2.eval.retrieval_metrics import hard_pair_itc, itm_hard_pair_metrics, retrieval_recall

    dev = ctx.device or next(task.parameters()).device
    texts = [c for caps in data.captions for c in caps]
    counts = [len(caps) for caps in data.captions]
    tok = ctx.tokenizer(texts, max_length=ctx.max_text_len)
    ids, tmask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
    vis, vmask, f_v, text, f_t = task.encode(data.pixels.to(dev), ids, tmask)
    mine = (data.positions, vis.cpu(), vmask.cpu(), f_v.cpu(), text.cpu(), tmask.cpu(), f_t.cpu(), counts)
    parts = gather(mine)
    items: list[tuple] = []          # (position, vis, vmask, f_v, [(text, tmask, f_t), ...])
    for pos, v, vm, fv, t, tm, ft, cnt in parts:
        start = 0
        for r, p in enumerate(pos):
            n = cnt[r]
            items.append((p, v[r], vm[r], fv[r], [(t[start + j], tm[start + j], ft[start + j]) for j in range(n)]))
            start += n
    items.sort(key=lambda x: x[0])
    text_to_item = [i for i, it in enumerate(items) for _ in it[4]]
    g_vis = torch.stack([it[1] for it in items]).to(dev)
    g_vmask = torch.stack([it[2] for it in items]).to(dev)
    g_fv = torch.stack([it[3] for it in items]).to(dev)
    g_text = torch.stack([t[0] for it in items for t in it[4]]).to(dev)
    g_tmask = torch.stack([t[1] for it in items for t in it[4]]).to(dev)
    g_ft = torch.stack([t[2] for it in items for t in it[4]]).to(dev)
    sim = g_fv.float() @ g_ft.float().t()
    rank, world = rank_and_world()
    my_items = [i for i in range(len(items)) if i % world == rank]
    my_texts = [j for j in range(len(text_to_item)) if text_to_item[j] % world == rank]
    k = ctx.options.k_test if isinstance(ctx.options, RetrievalOptions) else RetrievalOptions().k_test
    i2t_rows, t2i_rows = task.rerank(sim, g_vis, g_vmask, g_text, g_tmask, my_items, my_texts,
                                     k=min(k, len(items)))
    rows = gather((my_items, i2t_rows.cpu(), my_texts, t2i_rows.cpu()))
    i2t = torch.stack(by_position([(r[0], list(r[1])) for r in rows]))
    t2i = torch.stack(by_position([(r[2], list(r[3])) for r in rows]))
    out = retrieval_recall(i2t, text_to_item, sim_t2i=t2i)
    out.update({f"itc_{key}": v for key, v in retrieval_recall(sim.cpu(), text_to_item).items()})
    if len(items) > 2:   # ITM on held-out hard pairs: each rank its own texts, gathered
        logp = task.hard_pair_logp(sim, g_vis, g_vmask, g_text, g_tmask, my_texts, text_to_item)
        itc = hard_pair_itc(sim.cpu(), text_to_item)[my_texts]
        parts = gather((logp.cpu(), itc))
        out.update(itm_hard_pair_metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return {key: float(v) for key, v in out.items()}


SPEC = TaskSpec("retrieval", "text<->video/image retrieval: ITC top-k, ITM re-rank; R@1/5/10 both ways",
                _build_retrieval, _evaluate_retrieval, options_type=RetrievalOptions)
