"""Video / image classification with labels from each sample's json; top-1 / top-5. Its export carries the
class names (``classes.json``), as text classification's does."""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather


def _validate_classify(cfg: RunConfig) -> None:
    if len(cfg.classes) < 2 or len(set(cfg.classes)) != len(cfg.classes):
        raise ValueError(f"task 'classify' needs `classes`: at least two distinct label names, got {cfg.classes!r}")


def _build_classify(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.classify import ClassifyTask

    return ClassifyTask(model, cfg.classes)


def _evaluate_classify(task: nn.Module, data: EvalSet, ctx: EvalContext) -> dict[str, float]:
    if not data.labels or any(lb is None for lb in data.labels):
        raise ValueError("the classification eval corpus needs a label in every sample's json")
    dev = ctx.device or next(task.parameters()).device
    bs = ctx.batch_size
    gold = task.label_ids(list(data.labels))
    logits = torch.cat([task.logits(data.pixels[i:i + bs].to(dev)).cpu() for i in range(0, len(data.keys), bs)])
    rows = by_position(gather((data.positions, list(zip(logits, gold)))))
    logits, gold = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return {"top1": 100.0 * float((topk[:, 0] == gold).float().mean()),
            f"top{k}": 100.0 * float((topk == gold[:, None]).any(dim=1).float().mean())}


def classes_file(task: nn.Module) -> dict[str, bytes]:
    return {"classes.json": json.dumps(list(task.classes)).encode()}


def classes_from_export(read: Callable[[str], bytes | None]) -> dict[str, Any]:
    raw = read("classes.json")
    if raw is None:
        raise ValueError("the model folder has no classes.json: export a `classify` or `text_classify` run's "
                         "best/final model")
    return {"classes": json.loads(raw)}


SPEC = TaskSpec("classify", "video/image classification, labels from each sample's json; top-1 / top-5",
                _build_classify, _evaluate_classify, validate=_validate_classify, export_files=classes_file,
                import_fields=classes_from_export)
