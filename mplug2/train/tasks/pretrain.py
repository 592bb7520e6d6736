"""Pretraining: ITC + ITM + MLM + prefix LM (mplug2.objectives.pretrain), with no held-out evaluation of its own."""

from __future__ import annotations

from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.tasks.spec import RunConfig, TaskSpec


def _build_pretrain(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.objectives.pretrain import MPLUG2Pretrainer, PretrainConfig

    w, total = cfg.loss_weights, cfg.schedule.total_steps
    return MPLUG2Pretrainer(model, tokenizer, PretrainConfig(
        itc_weight=w.get("itc", 1.0), itm_weight=w.get("itm", 1.0), mlm_weight=w.get("mlm", 1.0),
        prefix_lm_weight=w.get("prefix_lm", 1.0), global_batch=cfg.data.batch_size * world_size,
        alpha_ramp_steps=min(total, max(1, total // 10))))


SPEC = TaskSpec("pretrain", "ITC + ITM + MLM + prefix-LM pretraining", _build_pretrain, uses_every_parameter=True)
