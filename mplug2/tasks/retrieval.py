"""Text-video / image-text retrieval (mPLUG v1 ``model_retrieval_mplug.py`` / ``retrieval_vid_mplug.py``, §5).

Fine-tuning = ITC (id-aware positives, queue, momentum distillation) + ITM with hard negatives: the
pretraining wrapper with MLM and prefix LM switched off. Evaluation computes every feature once, runs ITC over
the full similarity matrix, then ITM only on each query's top-k (k_test 128/256 at scale) and scores those
pairs with :func:`rerank_score`; everything outside the top-k scores −inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mplug2.eval.retrieval_metrics import (hard_pair_itc, hard_pair_wrong_items, itm_hard_pair_metrics,
                                          retrieval_recall)
from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.pretrain import MPLUG2Pretrainer, PretrainConfig

__all__ = ["RetrievalConfig", "RetrievalScores", "Retriever", "RerankCandidates", "evaluate_retrieval", "rerank_score",
           "rerank_hits", "choose_itm_weight", "RERANK_ITM_WEIGHTS"]

_OUTSIDE = float("-inf")   # below every re-ranked score, whatever the temperature


def rerank_score(itm_logits: Tensor, sim: Tensor, temp: float | Tensor, itm_weight: float = 1.0) -> Tensor:
    """Score of re-ranked pairs: ITC logit ``sim / temp`` + ``itm_weight`` · ITM ``log p(match)``.

    Both terms are log-likelihoods on the scale each head was trained on (ITC's softmax over candidates takes
    ``sim / temp``; the ITM head's softmax gives ``log p(match)``), so at weight 1 the sum ranks by the product
    of the two heads' probabilities. The raw ``ITM logit + cosine`` of mPLUG / BLIP mixes an unbounded logit with
    a cosine whose spread over a query's top-k is a few hundredths: any noise in a weak ITM head overrides the
    ITC order (issue 14: re-ranking *below* ITC alone); here an uninformative ITM head (same logits for every
    candidate) leaves the ITC order as it is. The weight is chosen on a validation corpus
    (:func:`choose_itm_weight`); 0 keeps ITC's order.
    """
    return sim / temp + itm_weight * torch.log_softmax(itm_logits.float(), dim=-1)[:, 1]


# The ITM weights a validation corpus chooses from (0: ITC alone); 1 is the default without one.
RERANK_ITM_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class RerankCandidates:
    """Each query's ITC top-k and the two terms :func:`rerank_score` adds for them."""

    top: Tensor        # (queries, k) candidate indices, ITC's order
    itc: Tensor        # (queries, k) sim / temp
    itm_logp: Tensor   # (queries, k) ITM log p(match)

    def scores(self, itm_weight: float) -> Tensor:
        return self.itc + itm_weight * self.itm_logp

    def top1(self, itm_weight: float) -> Tensor:
        """(queries,) the candidate each query ranks first at this weight."""
        return self.top.gather(1, self.scores(itm_weight).argmax(1, keepdim=True)).squeeze(1)


def rerank_hits(i2t: RerankCandidates, t2i: RerankCandidates, item_rows: Sequence[int], text_rows: Sequence[int],
                text_to_item: Sequence[int], weights: Sequence[float] = RERANK_ITM_WEIGHTS) -> Tensor:
    """``(len(weights), 2)``: how many of these item queries (column 0) and text queries (column 1) rank their
    own text / item first at each ITM weight. Counts of disjoint query sets add up across ranks."""
    owner = torch.as_tensor(list(text_to_item), dtype=torch.long, device=i2t.top.device)
    items = torch.as_tensor(list(item_rows), dtype=torch.long, device=i2t.top.device)
    gold = owner[torch.as_tensor(list(text_rows), dtype=torch.long, device=t2i.top.device)]
    return torch.tensor([[int((owner[i2t.top1(w)] == items).sum()) if len(items) else 0,
                          int((t2i.top1(w) == gold).sum()) if len(gold) else 0] for w in weights])


def choose_itm_weight(hits: Tensor, n_items: int, n_texts: int,
                      weights: Sequence[float] = RERANK_ITM_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight whose mean R@1 (item→text and text→item, percent) is highest, and every weight's figure.
    Ties go to the weight nearest 1 (the product of the two heads' probabilities), then to the smaller one:
    a validation corpus moves the weight only where it measures a difference."""
    r1 = {w: 50.0 * (float(h[0]) / max(n_items, 1) + float(h[1]) / max(n_texts, 1)) for w, h in zip(weights, hits)}
    best = max(r1.values())

    def distance(w: float) -> tuple[float, float]:
        return (abs(math.log2(w)) if w > 0 else math.inf, w)

    return min((w for w in weights if r1[w] == best), key=distance), r1


@dataclass
class RetrievalConfig:
    k_test: int = 128
    queue_size: int | None = None     # None -> model config
    distill: bool = True
    global_batch: int | None = None
    itm_weight: float = 1.0           # of the ITM loss in training
    rerank_itm_weight: float = 1.0    # of ITM's log p(match) in the re-rank (rerank_score); data.val tunes it
    batch_size: int = 32              # evaluation chunk size


@dataclass
class RetrievalScores:
    itc_i2t: Tensor    # (N_items, N_texts) ITC cosine similarities
    i2t: Tensor        # (N_items, N_texts) re-ranked scores (−inf outside each row's top-k)
    t2i: Tensor        # (N_texts, N_items) re-ranked scores (−inf outside each row's top-k)


class Retriever(nn.Module):
    """Batch for training: ``{"pixels", "input_ids", "attention_mask", "ids"}`` (ids = item id per pair)."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: RetrievalConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or RetrievalConfig()
        self.core = MPLUG2Pretrainer(model, tokenizer, PretrainConfig(
            itm_weight=cfg.itm_weight, mlm_weight=0.0, prefix_lm_weight=0.0, queue_size=cfg.queue_size,
            distill=cfg.distill, global_batch=cfg.global_batch, use_ids=True))

    @property
    def model(self) -> MPLUG2:
        return self.core.model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.core(batch)
        return {k: out[k] for k in ("loss", "itc", "itm", "itm_acc", "itm_rev_acc", "alpha", "temp") if k in out}

    def momentum_update(self) -> None:
        self.core.momentum_update()

    def param_groups(self, lr: float, lr_vision: float, weight_decay: float, lr_temp: float | None = None,
                     lr_temporal: float | None = None) -> list[dict]:
        return self.core.param_groups(lr, lr_vision, weight_decay, lr_temp=lr_temp, lr_temporal=lr_temporal)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode_items(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(V, V_mask, f_v)`` for a chunk of images/videos."""
        vis, vis_mask = self.model.encode_vision(pixels)
        return vis, vis_mask, self.core.itc.embed_vision(vis[:, 0])

    @torch.no_grad()
    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(T, f_t)`` for a chunk of texts."""
        text = self.model.encode_text(input_ids, attention_mask)
        return text, self.core.itc.embed_text(text[:, 0])

    @torch.no_grad()
    def itm_logits(self, vis: Tensor, vis_mask: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """ITM logits ``(B, 2)`` ("no match", "match") for aligned pairs (row i of each), float32."""
        _, fused = self.model.fuse(text, text_mask, vis, vis_mask)
        return self.core.itm_head(fused).float()

    @torch.no_grad()
    def itm_scores(self, vis: Tensor, vis_mask: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """ITM "match" logit for aligned pairs (row i of each)."""
        return self.itm_logits(vis, vis_mask, text, text_mask)[:, 1]

    @torch.no_grad()
    def encode(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(V, V_mask, f_v, T, f_t)`` of every item and text, in chunks of ``batch_size``."""
        bs = self.cfg.batch_size
        items = [self.encode_items(pixels[i:i + bs]) for i in range(0, len(pixels), bs)]
        texts = [self.encode_texts(input_ids[i:i + bs], attention_mask[i:i + bs])
                 for i in range(0, len(input_ids), bs)]
        return (torch.cat([x[0] for x in items]), torch.cat([x[1] for x in items]), torch.cat([x[2] for x in items]),
                torch.cat([x[0] for x in texts]), torch.cat([x[1] for x in texts]))

    @torch.no_grad()
    def predict(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor,
                k: int | None = None) -> RetrievalScores:
        """Score every item against every text: ITC over all pairs, ITM re-rank of each query's top-k."""
        return self._predict(pixels, input_ids, attention_mask, k)[0]

    def _predict(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, k: int | None = None,
                 text_to_item: Sequence[int] | None = None) -> tuple[RetrievalScores, Tensor | None]:
        """:meth:`predict`, plus :meth:`hard_pair_logp` of every text when ``text_to_item`` is given."""
        was_training = self.training
        self.eval()
        try:
            vis, vmask, f_v, text, f_t = self.encode(pixels, input_ids, attention_mask)
            sim = f_v.float() @ f_t.float().t()
            i2t, t2i = self.rerank(sim, vis, vmask, text, attention_mask, range(sim.shape[0]), range(sim.shape[1]), k)
            hard = None
            if text_to_item is not None:
                hard = self.hard_pair_logp(sim, vis, vmask, text, attention_mask, range(sim.shape[1]), text_to_item)
            return RetrievalScores(itc_i2t=sim, i2t=i2t, t2i=t2i), hard
        finally:
            self.train(was_training)

    @torch.no_grad()
    def rerank(self, sim: Tensor, vis: Tensor, vmask: Tensor, text: Tensor, tmask: Tensor,
               item_rows: Sequence[int], text_rows: Sequence[int], k: int | None = None) -> tuple[Tensor, Tensor]:
        """ITM re-rank of the top-k ITC candidates for the given query rows only (a rank's share of the
        queries): ``(i2t (len(item_rows), N_texts), t2i (len(text_rows), N_items))``, −inf outside the top-k,
        scored by :func:`rerank_score` at ``cfg.rerank_itm_weight``."""
        i2t_c, t2i_c = self.candidates(sim, vis, vmask, text, tmask, item_rows, text_rows, k)
        w = self.cfg.rerank_itm_weight
        i2t = torch.full((len(item_rows), sim.shape[1]), _OUTSIDE, dtype=sim.dtype, device=sim.device)
        i2t.scatter_(1, i2t_c.top, i2t_c.scores(w).to(sim.dtype))
        t2i = torch.full((len(text_rows), sim.shape[0]), _OUTSIDE, dtype=sim.dtype, device=sim.device)
        t2i.scatter_(1, t2i_c.top, t2i_c.scores(w).to(sim.dtype))
        return i2t, t2i

    @torch.no_grad()
    def candidates(self, sim: Tensor, vis: Tensor, vmask: Tensor, text: Tensor, tmask: Tensor,
                   item_rows: Sequence[int], text_rows: Sequence[int], k: int | None = None
                   ) -> tuple[RerankCandidates, RerankCandidates]:
        """Each given query's ITC top-k with ITM run on it: ``(item→text, text→item)``."""
        n_items, n_texts = sim.shape
        k = min(k or self.cfg.k_test, n_texts)
        k2 = min(k, n_items)
        temp = float(self.core.itc.temp)

        def empty(width: int) -> RerankCandidates:
            return RerankCandidates(torch.empty(0, width, dtype=torch.long, device=sim.device),
                                    torch.empty(0, width, device=sim.device), torch.empty(0, width, device=sim.device))

        def stack(parts: list[tuple[Tensor, Tensor, Tensor]], width: int) -> RerankCandidates:
            if not parts:
                return empty(width)
            top, itc, logp = (torch.stack(x) for x in zip(*parts))
            return RerankCandidates(top, itc.float(), logp)

        i2t = []
        for i in item_rows:
            top_sim, top = sim[i].topk(k)
            logits = self._chunked_itm(vis[i:i + 1].expand(k, -1, -1), vmask[i:i + 1].expand(k, -1),
                                       text[top], tmask[top])
            i2t.append((top, top_sim / temp, torch.log_softmax(logits.float(), dim=-1)[:, 1]))
        t2i = []
        for j in text_rows:
            top_sim, top = sim[:, j].topk(k2)
            logits = self._chunked_itm(vis[top], vmask[top], text[j:j + 1].expand(k2, -1, -1),
                                       tmask[j:j + 1].expand(k2, -1))
            t2i.append((top, top_sim / temp, torch.log_softmax(logits.float(), dim=-1)[:, 1]))
        return stack(i2t, k), stack(t2i, k2)

    @torch.no_grad()
    def hard_pair_logp(self, sim: Tensor, vis: Tensor, vmask: Tensor, text: Tensor, tmask: Tensor,
                       text_rows: Sequence[int], text_to_item: Sequence[int], hard: int = 2) -> Tensor:
        """ITM ``log p(match)`` of each given text with its own item (column 0) and with ITC's ``hard`` most
        similar wrong items: ``(len(text_rows), 1 + hard)``, for
        :func:`~mplug2.eval.retrieval_metrics.itm_hard_pair_metrics`."""
        rows = list(text_rows)
        if not rows:   # a rank without queries of its own
            return torch.empty(0, 1 + hard, device=sim.device)
        own = torch.as_tensor([text_to_item[j] for j in rows], dtype=torch.long, device=sim.device)
        wrong = hard_pair_wrong_items(sim, text_to_item, hard).to(sim.device)[rows]
        items = torch.cat([own[:, None], wrong], 1).flatten()
        texts = torch.as_tensor(rows, dtype=torch.long, device=sim.device).repeat_interleave(1 + hard)
        logits = self._chunked_itm(vis[items], vmask[items], text[texts], tmask[texts])
        return torch.log_softmax(logits, dim=-1)[:, 1].view(len(rows), 1 + hard)

    def _chunked_itm(self, vis, vmask, text, tmask) -> Tensor:
        bs = self.cfg.batch_size
        return torch.cat([self.itm_logits(vis[i:i + bs], vmask[i:i + bs], text[i:i + bs], tmask[i:i + bs])
                          for i in range(0, len(vis), bs)])


def evaluate_retrieval(retriever: Retriever, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor,
                       text_to_item: Sequence[int], k: int | None = None) -> dict[str, float]:
    """R@1/5/10 in both directions for the re-ranked scores, plus the ITC-only figures (``itc_`` prefix) and
    ITM on held-out hard pairs (:func:`~mplug2.eval.retrieval_metrics.itm_hard_pair_metrics`).

    ``text_to_item[j]`` is the item (row of ``pixels``) that text j describes; items may own several texts.
    """
    s, hard = retriever._predict(pixels, input_ids, attention_mask, k=k,
                                 text_to_item=text_to_item if len(pixels) > 2 else None)
    out = retrieval_recall(s.i2t, text_to_item, sim_t2i=s.t2i)
    out.update({f"itc_{key}": v for key, v in retrieval_recall(s.itc_i2t, text_to_item).items()})
    if hard is not None:
        out.update(itm_hard_pair_metrics(hard, hard_pair_itc(s.itc_i2t, text_to_item)))
    return out
