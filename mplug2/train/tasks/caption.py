"""Captioning: BLEU-4, ROUGE-L and CIDEr from pycocoevalcap on the gathered predictions."""

from __future__ import annotations

import logging

from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather

log = logging.getLogger(__name__)


def _build_caption(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.caption import CaptionConfig, Captioner

    return Captioner(model, tokenizer, CaptionConfig())


def _evaluate_caption(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    from mplug2.eval.caption_metrics import coco_caption_scores

    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    preds: list[str] = []
    for i in range(0, len(data.keys), bs):
        preds += task.predict(data.pixels[i:i + bs].to(dev))
    rows = by_position(gather((data.positions, list(zip(data.keys, preds, data.captions)))))
    cands = {key: text for key, text, _ in rows}
    refs = {key: caps for key, _, caps in rows}
    log.info("caption samples: %s", "; ".join(f"{k}: {cands[k]!r} (ref {refs[k][0]!r})" for k, *_ in rows[:3]))
    return {k: float(v) for k, v in coco_caption_scores(refs, cands).items()}


SPEC = TaskSpec("caption", "video/image captioning; BLEU-4, ROUGE-L, CIDEr (pycocoevalcap)",
                _build_caption, _evaluate_caption)
