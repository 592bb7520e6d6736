"""Visual grounding: expression -> box; accuracy at IoU >= 0.5 (RefCOCO's metric), mean IoU, and the best
constant box as chance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather, parse_options


@dataclass
class GroundingOptions:
    """``head``: ``tokens`` (model-spec §5: 4 box tokens from the decoder) or ``regression`` (an MLP on the
    fused [CLS], L1 + GIoU; mplug2.tasks.grounding.BoxRegressor). Box-token layout: None picks the vocabulary's
    default ([unused339] / [unused340]... for BERT, [unused8] / [unused9]... for the tiny vocab); ``num_bins``
    None = image_res + 1."""

    head: str = "tokens"
    prefix_token: str | None = None
    first_bin_token: str | None = None
    num_bins: int | None = None
    iou_threshold: float = 0.5

    def __post_init__(self) -> None:
        from mplug2.tasks.grounding import HEADS

        if self.head not in HEADS:
            raise ValueError(f"task_options.head must be one of {HEADS}, got {self.head!r}")
        if self.num_bins is not None and self.num_bins < 2:
            raise ValueError(f"task_options.num_bins must be >= 2, got {self.num_bins}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"task_options.iou_threshold must be in (0, 1], got {self.iou_threshold}")


def _validate_grounding(cfg: RunConfig) -> None:
    if cfg.data.train and cfg.data.augment:
        raise ValueError("task 'grounding' needs `data.augment: false`: RandAugment's shear / translate / rotate "
                         "move the pixels under the box (the crop and flip still apply, and move the box)")


def _build_grounding(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.grounding import GroundingConfig, GroundingTask

    opts = parse_options("grounding", GroundingOptions, cfg.task_options)
    base = GroundingConfig.tiny() if model.config.tokenizer == "tiny" else GroundingConfig()
    return GroundingTask(model, tokenizer, GroundingConfig(
        prefix_token=opts.prefix_token or base.prefix_token, first_bin_token=opts.first_bin_token
        or base.first_bin_token, num_bins=opts.num_bins), head=opts.head)


def _grounding_file(task: nn.Module) -> dict[str, bytes]:
    return {"grounding.json": json.dumps({"head": task.head}).encode()}


def _grounding_from_export(read: Callable[[str], bytes | None]) -> dict[str, Any]:
    raw = read("grounding.json")
    if raw is None:
        raise ValueError("the model folder has no grounding.json: export a `grounding` run's best/final model")
    return {"task_options": {"head": json.loads(raw)["head"]}}


def _evaluate_grounding(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    """acc@IoU >= 0.5 (RefCOCO's metric), mean IoU, and chance: the best one fixed box's accuracy."""
    from mplug2.tasks.grounding import best_constant_box_accuracy, box_iou

    if not data.boxes or any(b is None for b in data.boxes):
        raise ValueError("the grounding eval corpus needs a box in every sample's json (preprocess with --box-col)")
    opts = ctx.options if isinstance(ctx.options, GroundingOptions) else GroundingOptions()
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    preds = []
    for i in range(0, len(data.keys), bs):
        tok = ctx.tokenizer([c[0] for c in data.captions[i:i + bs]], max_length=ctx.max_text_len)
        preds.append(task.predict(data.pixels[i:i + bs].to(dev), tok["input_ids"].to(dev),
                                  tok["attention_mask"].to(dev)).cpu())
    pred = torch.cat(preds)
    rows = by_position(gather((data.positions, list(zip(pred, data.boxes)))))
    pred = torch.stack([r[0] for r in rows]).float()
    gold = torch.tensor([list(r[1]) for r in rows], dtype=torch.float32)
    iou = box_iou(pred, gold)
    return {"acc_iou50" if opts.iou_threshold == 0.5 else f"acc_iou{opts.iou_threshold:g}":
            100.0 * float((iou >= opts.iou_threshold).float().mean()),
            "mean_iou": 100.0 * float(iou.mean()),
            "chance_acc": 100.0 * best_constant_box_accuracy(gold, opts.iou_threshold)}


SPEC = TaskSpec("grounding", "visual grounding: expression -> box (box tokens or regression); acc@IoU>=0.5, "
                "mean IoU", _build_grounding, _evaluate_grounding, options_type=GroundingOptions,
                validate=_validate_grounding, export_files=_grounding_file, import_fields=_grounding_from_export)
