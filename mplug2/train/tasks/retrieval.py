"""Retrieval (text <-> video / image): ITC ranks everything, ITM re-ranks each query's top-k; R@1/5/10 both
ways, the ITC-only recalls beside them, and ITM on held-out hard pairs. With a validation corpus (``data.val``)
the re-rank's ITM weight is chosen there before each evaluation and exported beside the model (``rerank.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mplug2.model_folder import RERANK_FILE, parse_rerank_file, rerank_file
from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather, rank_and_world


@dataclass
class RetrievalOptions:
    k_test: int = 16                # ITM re-ranks each query's top-k ITC candidates (128/256 at scale)
    # ITM's weight in the re-rank (sim/T + w log p(match)); a run with data.val chooses it there instead
    rerank_itm_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.k_test < 1:
            raise ValueError(f"task_options.k_test must be >= 1, got {self.k_test}")
        if not self.rerank_itm_weight >= 0:
            raise ValueError(f"task_options.rerank_itm_weight must be >= 0 (0: ITC's order), "
                             f"got {self.rerank_itm_weight}")


def _build_retrieval(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.retrieval import RetrievalConfig, Retriever

    return Retriever(model, tokenizer, RetrievalConfig(
        global_batch=cfg.data.batch_size * world_size, itm_weight=cfg.loss_weights.get("itm", 1.0),
        rerank_itm_weight=cfg.options.rerank_itm_weight))


@dataclass
class _Gathered:
    """Every rank's features of the corpus, in manifest order, and this rank's share of the queries."""

    text_to_item: list[int]
    vis: torch.Tensor
    vmask: torch.Tensor
    text: torch.Tensor
    tmask: torch.Tensor
    sim: torch.Tensor            # (items, texts) ITC cosines
    my_items: list[int]
    my_texts: list[int]
    k: int


def _gather_features(task: nn.Module, data: EvalSet, ctx: EvalContext) -> _Gathered:
    """Each rank encodes its items and their texts; the features are gathered so that every rank holds them
    all, and each rank takes the queries of its own items."""
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
    g_fv = torch.stack([it[3] for it in items]).to(dev)
    g_ft = torch.stack([t[2] for it in items for t in it[4]]).to(dev)
    rank, world = rank_and_world()
    k = ctx.options.k_test if isinstance(ctx.options, RetrievalOptions) else RetrievalOptions().k_test
    return _Gathered(
        text_to_item=text_to_item,
        vis=torch.stack([it[1] for it in items]).to(dev), vmask=torch.stack([it[2] for it in items]).to(dev),
        text=torch.stack([t[0] for it in items for t in it[4]]).to(dev),
        tmask=torch.stack([t[1] for it in items for t in it[4]]).to(dev),
        sim=g_fv.float() @ g_ft.float().t(),
        my_items=[i for i in range(len(items)) if i % world == rank],
        my_texts=[j for j in range(len(text_to_item)) if text_to_item[j] % world == rank],
        k=min(k, len(items)))


def _evaluate_retrieval(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Each rank re-ranks the queries of its own items (features gathered: :func:`_gather_features`); the
    re-ranked rows are gathered; every rank computes the same recalls."""
    from mplug2.eval.retrieval_metrics import hard_pair_itc, itm_hard_pair_metrics, retrieval_recall

    g = _gather_features(task, data, ctx)
    i2t_rows, t2i_rows = task.rerank(g.sim, g.vis, g.vmask, g.text, g.tmask, g.my_items, g.my_texts, k=g.k)
    rows = gather((g.my_items, i2t_rows.cpu(), g.my_texts, t2i_rows.cpu()))
    i2t = torch.stack(by_position([(r[0], list(r[1])) for r in rows]))
    t2i = torch.stack(by_position([(r[2], list(r[3])) for r in rows]))
    out = retrieval_recall(i2t, g.text_to_item, sim_t2i=t2i)
    out.update({f"itc_{key}": v for key, v in retrieval_recall(g.sim.cpu(), g.text_to_item).items()})
    if g.sim.shape[0] > 2:   # ITM on held-out hard pairs: each rank its own texts, gathered
        logp = task.hard_pair_logp(g.sim, g.vis, g.vmask, g.text, g.tmask, g.my_texts, g.text_to_item)
        itc = hard_pair_itc(g.sim.cpu(), g.text_to_item)[g.my_texts]
        parts = gather((logp.cpu(), itc))
        out.update(itm_hard_pair_metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    out["rerank_itm_weight"] = task.cfg.rerank_itm_weight
    return {key: float(v) for key, v in out.items()}


def _calibrate_retrieval(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Choose the re-rank's ITM weight on the validation corpus: the one with the best mean R@1 of the two
    directions (:func:`~mplug2.tasks.retrieval.choose_itm_weight`); each rank counts its own queries' hits."""
    from mplug2.tasks.retrieval import RERANK_ITM_WEIGHTS, choose_itm_weight, rerank_hits

    g = _gather_features(task, data, ctx)
    i2t, t2i = task.candidates(g.sim, g.vis, g.vmask, g.text, g.tmask, g.my_items, g.my_texts, k=g.k)
    hits = sum(gather(rerank_hits(i2t, t2i, g.my_items, g.my_texts, g.text_to_item, RERANK_ITM_WEIGHTS)))
    weight, r1 = choose_itm_weight(hits, g.sim.shape[0], g.sim.shape[1], RERANK_ITM_WEIGHTS)
    task.cfg.rerank_itm_weight = weight
    return {"val_rerank_r1_mean": r1[weight], "val_itc_r1_mean": r1[0.0], "val_rerank_r1_mean_at_1": r1[1.0]}


def _rerank_file(task: nn.Module) -> dict[str, bytes]:
    return {RERANK_FILE: rerank_file(task.cfg.rerank_itm_weight)}


def _rerank_from_export(read: Callable[[str], bytes | None]) -> dict[str, Any]:
    raw = read(RERANK_FILE)          # exports made before the weight was recorded: the default
    return {"task_options": {"rerank_itm_weight": parse_rerank_file(raw)}} if raw is not None else {}


SPEC = TaskSpec("retrieval", "text<->video/image retrieval: ITC top-k, ITM re-rank; R@1/5/10 both ways",
                _build_retrieval, _evaluate_retrieval, options_type=RetrievalOptions,
                calibrate=_calibrate_retrieval, export_files=_rerank_file, import_fields=_rerank_from_export)
