"""Retrieval recall R@K from similarity matrices, aware of several captions per image/video.

Rows are images/videos, columns are texts. ``text_to_item[j]`` is the item that text j describes (an item
may own several texts, MSRVTT/COCO style). Image→text: an item's rank is the best rank of any of its texts
(ALBEF/mPLUG ``itm_eval``). Text→image: the rank of the text's own item. Ties are broken pessimistically
(a tie with a wrong candidate counts against the query), so a constant matrix never scores R@1 = 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["retrieval_ranks", "recall_at_k", "retrieval_recall", "hard_pair_wrong_items", "hard_pair_itc",
           "itm_hard_pair_metrics"]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def retrieval_ranks(sim_i2t, text_to_item: Sequence[int], sim_t2i=None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks ``(i2t_ranks (N_items,), t2i_ranks (N_texts,))`` of the best correct match.

    ``sim_t2i`` (N_texts, N_items) scores the text→item direction separately (ITM re-ranking produces one
    matrix per direction); by default it is ``sim_i2t`` transposed.
    """
    sim = _as_numpy(sim_i2t)
    sim_cols = sim if sim_t2i is None else _as_numpy(sim_t2i).T
    if sim_cols.shape != sim.shape:
        raise ValueError(f"sim_t2i must be (texts, items) = {sim.shape[::-1]}, got {sim_cols.shape[::-1]}")
    n_items, n_texts = sim.shape
    t2i = np.asarray(text_to_item, dtype=np.int64)
    if t2i.shape != (n_texts,):
        raise ValueError(f"text_to_item has {t2i.shape[0]} entries for {n_texts} text columns")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_items):
        raise ValueError("text_to_item holds an item index outside the similarity matrix rows")
    correct = t2i[None, :] == np.arange(n_items)[:, None]          # (items, texts)
    if not correct.any(axis=1).all():
        missing = np.flatnonzero(~correct.any(axis=1))[:5].tolist()
        raise ValueError(f"items {missing} have no text; every row needs at least one caption")
    # i2t: best correct score per row; rank = number of wrong texts scoring >= it.
    best = np.where(correct, sim, -np.inf).max(axis=1)
    i2t = ((sim >= best[:, None]) & ~correct).sum(axis=1)
    # t2i: for text j, rank of its item among all items (column view).
    own = sim_cols[t2i, np.arange(n_texts)]
    t2i_rank = ((sim_cols >= own[None, :]) & ~correct).sum(axis=0)
    return i2t, t2i_rank


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose correct answer ranks in the top ``k``."""
    return 100.0 * float((np.asarray(ranks) < k).mean()) if len(ranks) else float("nan")


def retrieval_recall(sim_i2t, text_to_item: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     sim_t2i=None) -> dict[str, float]:
    """``txt_r{k}`` (image→text), ``img_r{k}`` (text→image), their means and ``r_mean`` (in percent)."""
    i2t, t2i = retrieval_ranks(sim_i2t, text_to_item, sim_t2i)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = recall_at_k(i2t, k)
    for k in ks:
        out[f"img_r{k}"] = recall_at_k(t2i, k)
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def hard_pair_wrong_items(sim_i2t: torch.Tensor, text_to_item: Sequence[int], hard: int = 2) -> torch.Tensor:
    """(N_texts, hard): for each text, the ``hard`` items ITC finds most similar that are not its own item —
    the near-identical candidates an ITM re-ranker exists for."""
    sim = sim_i2t.float().t().clone()                     # (texts, items)
    own = torch.as_tensor(list(text_to_item), dtype=torch.long, device=sim.device)
    if hard >= sim.shape[1]:
        raise ValueError(f"hard pairs need more than {hard} items, got {sim.shape[1]}")
    sim[torch.arange(sim.shape[0], device=sim.device), own] = float("-inf")
    return sim.topk(hard, dim=1).indices


def hard_pair_itc(sim_i2t: torch.Tensor, text_to_item: Sequence[int], hard: int = 2) -> torch.Tensor:
    """(N_texts, 1 + hard) ITC similarity of each text with its own item and its ``hard`` nearest wrong items,
    laid out as :func:`itm_hard_pair_metrics` reads them."""
    sim = sim_i2t.float().t()                              # (texts, items)
    own = torch.as_tensor(list(text_to_item), dtype=torch.long, device=sim.device)[:, None]
    return sim.gather(1, torch.cat([own, hard_pair_wrong_items(sim_i2t, text_to_item, hard)], 1))


def itm_hard_pair_metrics(logp_match, itc_sim=None) -> dict[str, float]:
    """ITM on held-out hard pairs, from ``logp_match`` (N_texts, 1 + hard): ``log p(match)`` of each text with
    its own item (column 0) and with ITC's hardest wrong items (:func:`hard_pair_wrong_items`).

    ``itm_hard_pair_acc``: % of (own, wrong) pairs where ITM scores the own item higher — what re-ranking uses,
    threshold-free; a random head scores 50 %. ``itm_hard_acc``: argmax accuracy on all those pairs, as the training batch's
    ``itm_acc`` on 1 positive : ``hard`` negatives; always answering "no match" scores hard / (1 + hard).
    Harder than the training figure: the negatives are ITC's nearest neighbours among held-out items, which
    mostly differ from the own item in one attribute, where training batches rarely hold such a neighbour.
    ``itc_sim`` (:func:`hard_pair_itc`) adds ``itc_hard_pair_acc``, ITC's own figure on the same pairs: the pairs
    are ITC's confusions, so a head that copies ITC scores that, not 50 %; ITM above it is what re-ranking adds.
    """
    lp = torch.as_tensor(_as_numpy(logp_match))
    if lp.dim() != 2 or lp.shape[1] < 2:
        raise ValueError(f"logp_match must be (N_texts, 1 + hard), got {tuple(lp.shape)}")
    half = float(np.log(0.5))
    pair = (lp[:, :1] > lp[:, 1:]).float().mean().item()
    argmax = torch.cat([(lp[:, 0] > half).float(), (lp[:, 1:] <= half).float().flatten()]).mean().item()
    out = {"itm_hard_pair_acc": 100.0 * pair, "itm_hard_acc": 100.0 * argmax}
    if itc_sim is not None:
        sim = torch.as_tensor(_as_numpy(itc_sim))
        if sim.shape != lp.shape:
            raise ValueError(f"itc_sim must match logp_match's shape {tuple(lp.shape)}, got {tuple(sim.shape)}")
        out["itc_hard_pair_acc"] = 100.0 * (sim[:, :1] > sim[:, 1:]).float().mean().item()
    return out
