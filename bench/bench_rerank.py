"""What ITC and ITM each tell apart on held-out clips, and R@1 under re-rank rules (issue 14).

    python -m bench rerank --model s3://mplug2/demo/runs/demo-retrieval/best \\
        --eval s3://mplug2/demo/corpora/videos_eval [--k 16]

Scores every (clip, caption) pair with ITC (cosine) and ITM (``log p(match)``), then prints R@1 both ways for
ITC alone, ITM alone and ``sim / temp + w · log p(match)`` on each query's ITC top-k (evaluation's
:func:`~mplug2.tasks.retrieval.rerank_score` at the weight the export records, ``rerank.json``: chosen on a
validation corpus, else 1), the correlation of the two heads' scores over the top-k (a re-ranker
that only repeats ITC cannot improve on it), ITM on held-out hard pairs (evaluation's ``itm_hard_*`` figures),
and, for the synthetic corpus, how often each head puts a caption's own clip above a clip that differs from it in
one of colour / shape / direction / size / speed (the others equal). The evaluation rule's changes to ITC's
top-1 are counted per query: changed, won (to the right item), lost (from it); a re-ranker whose wins barely
outnumber its losses only adds noise. Not a timing: a diagnosis.
"""

from __future__ import annotations

import argparse

import torch

from mplug2.eval.retrieval_metrics import hard_pair_itc, hard_pair_wrong_items, itm_hard_pair_metrics
from mplug2.inference import Predictor
from mplug2.tasks.retrieval import rerank_score
from mplug2.train.evalset import load_eval_set

ATTRIBUTES = ("colour", "shape", "direction", "size", "speed")


def _attributes(caption: str) -> dict[str, str | None]:
    from pipelines.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

    words = caption.split()
    vocab = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "size": SIZES, "speed": SPEEDS}
    return {a: next((w for w in words if w in v), None) for a, v in vocab.items()}


def score_pairs(pred: Predictor, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sim, itm)``: ITC cosine and ITM logits ``(..., 2)`` of every (item, caption), items x captions."""
    r = pred.retriever
    tok = pred.tok(captions, max_length=pred.config.max_text_len)
    with torch.no_grad():
        vis, vmask, f_v, text, f_t = r.encode(pixels, tok["input_ids"], tok["attention_mask"])
        n = len(captions)
        itm = torch.stack([r.itm_logits(vis, vmask, text[j:j + 1].expand(len(vis), -1, -1),
                                        tok["attention_mask"][j:j + 1].expand(len(vis), -1)) for j in range(n)], 1)
    return f_v.float() @ f_t.float().t(), itm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a retrieval run's export (best/ or final/)")
    p.add_argument("--eval", required=True, help="held-out corpus (shards), one caption per item")
    p.add_argument("--split", default="eval")
    p.add_argument("--k", type=int, default=16, help="re-rank depth (evaluation's k_test)")
    args = p.parse_args()
    try:
        pred = Predictor.load(args.model)
        data = load_eval_set(args.eval, args.split, pred.num_frames, pred.image_res)
    except (OSError, ValueError) as exc:   # a missing / wrong folder: one line, not a traceback
        raise SystemExit(f"bench rerank: {exc}")
    captions = [c[0] for c in data.captions]
    sim, itm = score_pairs(pred, data.pixels, captions)
    n, k, temp = len(captions), min(args.k, len(captions)), pred.retriever.core.itc.temp.detach().item()
    logp = torch.log_softmax(itm, -1)[..., 1]
    t2v_top = torch.zeros(n, n, dtype=torch.bool).scatter_(0, sim.topk(k, dim=0).indices, True)
    v2t_top = torch.zeros(n, n, dtype=torch.bool).scatter_(1, sim.topk(k, dim=1).indices, True)
    gold = torch.arange(n)

    def top1(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (score.masked_fill(~t2v_top, float("-inf")).argmax(0),
                score.masked_fill(~v2t_top, float("-inf")).argmax(1))

    def r1(score: torch.Tensor) -> tuple[float, float]:
        return tuple(100 * (top == gold).float().mean().item() for top in top1(score))

    print(f"{n} items, ITC temperature {temp:.4f}, re-rank depth {k}; R@1 text->item / item->text")
    rules = [("ITC alone (cosine)", sim), ("ITM alone (log p(match))", logp)]
    chosen = pred.retriever.cfg.rerank_itm_weight      # the export's (rerank.json; 1 without one)
    rules += [(f"sim/T + {w:g} log p(match)" + ("  (evaluation)" if w == chosen else ""),
               rerank_score(itm.view(-1, 2), sim.flatten(), temp, itm_weight=w).view(n, n))
              for w in sorted({0.5, 1.0, 2.0, 4.0, chosen})]
    for name, score in rules:
        t, v = r1(score)
        print(f"  {name:36s} {t:5.1f}  {v:5.1f}")
    evaluation = next(score for name, score in rules if name.endswith("(evaluation)"))
    for direction, itc_top, new_top in zip(("text->item", "item->text"), top1(sim), top1(evaluation)):
        changed = itc_top != new_top
        print(f"evaluation's re-rank vs ITC alone, {direction}: top-1 changed for {int(changed.sum())} of {n} "
              f"queries, won {int((changed & (new_top == gold)).sum())}, lost {int((changed & (itc_top == gold)).sum())}")
    wrong = hard_pair_wrong_items(sim, range(n))                                    # (captions, 2)
    hard = itm_hard_pair_metrics(torch.cat([logp[gold, gold][:, None], logp[wrong, gold[:, None]]], 1),
                                 hard_pair_itc(sim, range(n)))
    print(f"held-out hard pairs (each caption, its own clip and ITC's 2 nearest wrong clips): own first, ITC "
          f"{hard['itc_hard_pair_acc']:.1f} % / ITM {hard['itm_hard_pair_acc']:.1f} % (a random head: 50); "
          f"ITM argmax accuracy {hard['itm_hard_acc']:.1f} % (prior 66.7)")
    corr = torch.corrcoef(torch.stack([sim[t2v_top], logp[t2v_top]]))[0, 1].item()
    print(f"correlation of ITC cosine and ITM log p(match) over each caption's top-{k}: {corr:.3f}")
    attrs = [_attributes(c) for c in captions]
    named = [a for a in ATTRIBUTES if all(x[a] for x in attrs)]      # the attributes every caption names
    if named:
        print("caption's own clip above a clip differing in one attribute (t2v): ITC / ITM right")
        for a in named:
            pairs = [(i, j) for j in range(n) for i in range(n) if attrs[i][a] != attrs[j][a]
                     and all(attrs[i][b] == attrs[j][b] for b in named if b != a)]
            if pairs:
                itc = sum(float(sim[j, j] > sim[i, j]) for i, j in pairs) / len(pairs)
                itm_ = sum(float(logp[j, j] > logp[i, j]) for i, j in pairs) / len(pairs)
                print(f"  {a:10s} {len(pairs):5d} pairs   {100 * itc:5.1f} % / {100 * itm_:5.1f} %")


if __name__ == "__main__":
    main()
