"""GLUE-style text classification from tsv files (no visual input): its own loader and eval data; accuracy,
and binary F1 / Matthews."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.tasks.classify import classes_file, classes_from_export
from mplug2.train.tasks.spec import EvalContext, RunConfig, TaskSpec, by_position, gather, parse_options


@dataclass
class TextClassifyOptions:
    text_columns: list[str] = field(default_factory=list)   # one or two header names; [] = GLUE's (glue.py)
    label_column: str = ""                                   # "" = label / gold_label / is_duplicate


def _read_text_split(cfg: RunConfig, path: str):
    from mplug2.data.glue import read_glue_tsv

    opts = parse_options("text_classify", TextClassifyOptions, cfg.task_options)
    return read_glue_tsv(path, text_columns=opts.text_columns, label_column=opts.label_column)


def _text_classes(cfg: RunConfig) -> list[str]:
    """The configured ``classes``, else the label set of the train file."""
    from mplug2.data.glue import label_set

    if cfg.classes:
        return list(cfg.classes)
    if not cfg.data.train:
        raise ValueError("task 'text_classify' needs `classes` or a train tsv (data.train) to read them from")
    return label_set(_read_text_split(cfg, cfg.data.train[0].path))


def _validate_text_classify(cfg: RunConfig) -> None:
    if len(cfg.data.train) > 1:
        raise ValueError(f"task 'text_classify' reads one train tsv, data.train lists {len(cfg.data.train)}")
    if cfg.classes and (len(cfg.classes) < 2 or len(set(cfg.classes)) != len(cfg.classes)):
        raise ValueError(f"text_classify `classes`: at least two distinct label names, got {cfg.classes!r}")


def _preflight_text_classify(cfg: RunConfig) -> None:
    """Read the train and eval tsv on the driver: a malformed file fails in one line before any worker starts."""
    from mplug2.data.glue import label_ids

    classes = _text_classes(cfg)
    if len(classes) < 2:
        raise ValueError(f"{cfg.data.train[0].path}: one label ({classes[0]!r}) in the train file; "
                         "classification needs at least two")
    if cfg.data.eval is not None:
        label_ids(_read_text_split(cfg, cfg.data.eval.path), classes)


def _build_text_classify(cfg: RunConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    from mplug2.tasks.classify import TextClassifyTask

    return TextClassifyTask(model, _text_classes(cfg))


def _text_train_loader(cfg: RunConfig, tokenizer, rank: int, world_size: int):
    from mplug2.data.glue import TextPairLoader

    if not cfg.data.train:
        raise ValueError("data.train names no train tsv")
    return TextPairLoader(_read_text_split(cfg, cfg.data.train[0].path), _text_classes(cfg), tokenizer,
                          batch_size=cfg.data.batch_size, max_length=cfg.data.max_text_len, seed=cfg.seed,
                          rank=rank, world_size=world_size)


def _load_text_eval(cfg: RunConfig, path: str, rank: int, world_size: int):
    data = _read_text_split(cfg, path)
    if len(data) < world_size:
        raise ValueError(f"eval tsv {path} has {len(data)} examples: fewer than the {world_size} ranks")
    return data.shard(rank, world_size)


def _evaluate_text_classify(task: nn.Module, data, ctx: EvalContext) -> dict[str, float]:
    """Each rank scores its slice of the tsv; predictions are gathered; accuracy (+ F1 and Matthews if binary)."""
    from mplug2.data.glue import label_ids, tokenize
    from mplug2.eval.classification_metrics import classification_scores

    dev = ctx.device or next(task.parameters()).device
    gold = label_ids(data, task.classes)
    preds = []
    for i in range(0, len(data), ctx.batch_size):
        enc = tokenize(ctx.tokenizer, data.text_a[i:i + ctx.batch_size],
                       None if data.text_b is None else data.text_b[i:i + ctx.batch_size], ctx.max_text_len)
        preds.append(task.logits(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).argmax(-1).cpu())
    rows = by_position(gather((data.positions, list(zip(torch.cat(preds).tolist(), gold.tolist())))))
    return classification_scores(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                                 len(task.classes))


SPEC = TaskSpec("text_classify", "GLUE-style text classification from a tsv (no visual input); accuracy, "
                "binary F1 / Matthews", _build_text_classify, _evaluate_text_classify,
                options_type=TextClassifyOptions, validate=_validate_text_classify, export_files=classes_file,
                import_fields=classes_from_export, train_loader=_text_train_loader, load_eval=_load_text_eval,
                preflight=_preflight_text_classify)
