"""Question answering: answers generated or ranked from an answer list; exact match, and VQA accuracy when
every question carries its human answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather

log = logging.getLogger(__name__)


@dataclass
class QAOptions:
    mode: str = "generate"          # generate: beam-search the answer | rank: pick it from an answer list
    answer_list: list[str] = field(default_factory=list)   # rank: the candidates (default: the eval answers)
    k_test: int = 128               # rank: candidates kept after the first-token pass

    def __post_init__(self) -> None:
        if self.mode not in ("generate", "rank"):
            raise ValueError(f"task_options.mode must be 'generate' or 'rank', got {self.mode!r}")
        if self.k_test < 1:
            raise ValueError(f"task_options.k_test must be >= 1, got {self.k_test}")


def _build_qa(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.qa import QATask

    return QATask(model, tokenizer, max_answer_len=model.config.max_answer_len)


def _qa_candidates(data: EvalSet, opts: QAOptions) -> list[str]:
    """The answer list: configured, else every answer of the eval corpus (gathered: the same on every rank)."""
    if opts.answer_list:
        return list(dict.fromkeys(opts.answer_list))
    mine = [a for a in data.answers if a is not None]
    mine += [a for lst in (data.answer_lists or []) if lst for a in lst]
    return sorted({a for part in gather(sorted(set(mine))) for a in part})


def _evaluate_qa(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """Exact-match accuracy against the sample's answer; VQA accuracy (min(#humans agreeing / 3, 1), averaged
    over the 10 leave-one-out subsets) when every question carries a list of human answers."""
    from mplug2.eval.qa_metrics import exact_match_accuracy, vqa_accuracy

    opts = ctx.options if isinstance(ctx.options, QAOptions) else QAOptions()
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    candidates = _qa_candidates(data, opts) if opts.mode == "rank" else []
    if candidates:
        enc = task.tok(candidates, max_length=task.max_answer_len + 2)
        cand_ids, cand_mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    preds: list[str] = []
    for i in range(0, len(data.keys), bs):
        tok = ctx.tokenizer([c[0] for c in data.captions[i:i + bs]], max_length=ctx.max_text_len)
        px, ids, mask = data.pixels[i:i + bs].to(dev), tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        if candidates:
            best = task.qa.rank_answer(px, ids, mask, cand_ids, cand_mask, k=opts.k_test).best
            preds += [candidates[j] for j in best.tolist()]
        else:
            preds += task.predict(px, ids, mask)
    lists = data.answer_lists or [None] * len(data.keys)
    rows = by_position(gather((data.positions, list(zip(data.captions, preds, data.answers, lists)))))
    log.info("qa samples: %s", "; ".join(f"{c[0]!r} -> {p!r} (gold {a!r})" for c, p, a, _ in rows[:3]))
    out = {"accuracy": float(exact_match_accuracy([r[1] for r in rows], [r[2] for r in rows]))}
    if all(r[3] for r in rows):
        out["vqa_accuracy"] = float(vqa_accuracy([r[1] for r in rows], [r[3] for r in rows]))
    return out


SPEC = TaskSpec("qa", "video/image QA: answer generation or answer-list ranking; exact-match and VQA accuracy",
                _build_qa, _evaluate_qa, options_type=QAOptions)
