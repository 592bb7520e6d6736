"""Build the pieces of a run from a :class:`~mplug2.train.config.TrainConfig`: model, task, optimiser,
LR schedule, data loaders, initial weights. Pure torch + storage: shared by the Ray Train worker loop and
the plain ``torch.distributed`` loop used for overhead benchmarks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mplug2 import storage
from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.train.config import TrainConfig
from mplug2.train.tasks import get_task

log = logging.getLogger(__name__)


def model_config(cfg: TrainConfig) -> MPLUG2Config:
    """``model`` may be a preset name, a YAML path, or a dict (``preset:`` plus overrides)."""
    m = cfg.model
    if isinstance(m, MPLUG2Config):
        return m
    if isinstance(m, dict):
        return MPLUG2Config.from_dict(m)
    if isinstance(m, str) and (m.endswith((".yaml", ".yml")) or Path(m).exists()):
        return MPLUG2Config.from_yaml(m)
    return MPLUG2Config.preset(str(m))


def build_task(cfg: TrainConfig, mcfg: MPLUG2Config, tokenizer, world_size: int) -> nn.Module:
    """The trainable module of ``cfg.task`` (from the registry): ``forward(batch) -> {"loss": ..., ...}``."""
    return get_task(cfg.task).build(cfg, MPLUG2(mcfg), tokenizer, world_size)


def vision_prefixes(module: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of every trainable dual-vision encoder inside ``module``."""
    out = []
    for name, sub in module.named_modules():
        if isinstance(sub, MPLUG2):
            out.append(f"{name}.vision." if name else "vision.")
    return tuple(out)


def build_optimizer(cfg: TrainConfig, task: nn.Module) -> torch.optim.Optimizer:
    """AdamW with the spec's two learning rates (vision lower), the temperature's and the temporal modules'
    own where configured, and the spec's no-decay rule."""
    from mplug2.objectives.pretrain import param_groups

    o = cfg.optim
    groups = param_groups(task, o.lr, o.lr_vision, o.weight_decay, vision_prefixes=vision_prefixes(task),
                          lr_temp=o.lr_temp, lr_temporal=o.lr_temporal)
    for g in groups:
        g["initial_lr"] = g["lr"]
    from mplug2.train.parallel import optimizer_impl

    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                             **optimizer_impl(task))


def lr_lambda(cfg: TrainConfig):
    """Linear warmup from 0, then cosine to ``min_lr_ratio`` at ``total_steps``; a picklable closure-free callable."""
    return _WarmupCosine(cfg.optim.warmup_steps, cfg.schedule.total_steps, cfg.optim.min_lr_ratio)


class _WarmupCosine:
    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def build_train_loader(cfg: TrainConfig, mcfg: MPLUG2Config, rank: int, world_size: int):
    """A :class:`~mplug2.data.mixing.MixedLoader` over the configured corpora for this rank."""
    from mplug2.data.loader import LoaderConfig, build_loader
    from mplug2.data.mixing import MixedLoader

    if not cfg.data.train:
        raise ValueError("data.train lists no corpus")
    d = cfg.data
    loaders, weights = {}, {}
    for c in d.train:
        lc = LoaderConfig(
            prefix=c.path, corpus=c.name, split=c.split, batch_size=d.batch_size, num_workers=d.num_workers, seed=cfg.seed,
            train=True, res=mcfg.vision.image_res, num_frames=c.num_frames, max_length=d.max_text_len,
            tokenizer=mcfg.tokenizer, shards_in_flight=d.shards_in_flight, shuffle_buffer=d.shuffle_buffer,
            randaug=d.augment, crop_scale=d.crop_scale, augment_on=d.augment_on,
            multiprocessing_context="forkserver" if d.num_workers else None,
            label_key=cfg.label_key, max_bad_samples=d.max_bad_samples, max_bad_fraction=d.max_bad_fraction,
            read_attempts=d.read_attempts,
        )
        loaders[c.name] = build_loader(lc, rank=rank, world_size=world_size)
        weights[c.name] = c.weight
    return MixedLoader(loaders, weights, seed=cfg.seed)


def resolve_init(url: str) -> str:
    """A folder holding ``model.safetensors`` or a DCP checkpoint (FSDP2) as is; a run directory -> its newest
    valid checkpoint."""
    from mplug2.train.checkpoint import DCP_METADATA, find_latest_valid, list_step_checkpoints

    if storage.exists(storage.join(url, "model.safetensors")) or storage.exists(storage.join(url, DCP_METADATA)):
        return url

    steps = list_step_checkpoints(url)
    found = find_latest_valid(steps) if steps else None      # no folder, or no checkpoint in it: no warning first
    if found is None:
        raise FileNotFoundError(f"{url}: neither a model folder (model.safetensors) nor a run with a valid checkpoint")
    return found


def load_init(task: nn.Module, url: str) -> dict[str, int]:
    """Initialise ``task`` from a training checkpoint folder (``model.safetensors`` or, from FSDP2 runs, DCP
    files, of any task wrapper) or a ``save_pretrained`` folder of :class:`MPLUG2`. Every MPLUG2 weight must be found; heads that exist in
    both (e.g. ITC projections) are copied; the rest stay freshly initialised and are reported."""
    url = resolve_init(url)
    if storage.exists(storage.join(url, "config.yaml")):      # save_pretrained folder: a bare MPLUG2
        from mplug2.model_folder import load_model_folder, read_heads

        src = {f"model.{k}": v for k, v in load_model_folder(url).state_dict().items()}
        src.update(read_heads(url))                             # task heads exported beside it
    else:                                                      # a training checkpoint of any task wrapper
        from mplug2.train.checkpoint import read_model_tensors

        src = read_model_tensors(url)
    target = task.state_dict()
    loaded, new, skipped = {}, [], []
    for k, v in target.items():
        if ".momentum." in f".{k}":
            continue                                           # re-copied from the online weights below
        parts = k.split(".")
        # Task wrappers nest the same modules under different prefixes (``core.model.`` vs ``model.``):
        # match the longest suffix present in the source.
        match = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in src), None)
        if match is not None and src[match].shape == v.shape:
            loaded[k] = src[match]
        elif match is not None:
            skipped.append(f"{k} {tuple(src[match].shape)} -> {tuple(v.shape)}")
        else:
            new.append(k)
    model_prefixes = [p[: -len("vision.")] for p in vision_prefixes(task)]   # every MPLUG2 inside the task
    core_missing = [k for k in new if any(k.startswith(p) for p in model_prefixes)]
    if core_missing:
        raise KeyError(f"{url}: the source lacks {len(core_missing)} model weights, e.g. {core_missing[:5]}")
    task.load_state_dict({**target, **loaded})
    from mplug2.objectives.momentum import MomentumPairs

    for sub in task.modules():
        if isinstance(sub, MomentumPairs):
            sub.update(momentum=0.0)                           # twins = the loaded online weights
    log.info("initialised from %s: %d tensors loaded, %d new (%s), %d shape mismatches %s", url, len(loaded),
             len(new), ", ".join(sorted({".".join(k.split(".")[:2]) for k in new}))[:200],
             len(skipped), skipped[:3])
    return {"loaded": len(loaded), "new": len(new), "skipped": len(skipped)}


@dataclass
class ExportedTask:
    """A fine-tuning run's export rebuilt as its task module (eval mode), with the config it was built from and
    :func:`load_init`'s report (``new`` > 0: some task weights were not in the folder and are untrained)."""

    module: nn.Module
    tokenizer: Any
    config: TrainConfig
    report: dict[str, int]


def load_exported_task(model_dir: str, task: str, options: dict[str, Any] | None = None,
                       label_key: str | None = None) -> ExportedTask:
    """A fine-tuning run's exported model folder (``<run>/best`` or ``final``) rebuilt as its task module, with
    what the export recorded beside the weights (``classes.json``, ``grounding.json``) and ``options`` over it.
    Shared by ``mplug2-train evaluate`` and inference. ``ValueError`` names what is missing (callers prefix the
    folder)."""
    import yaml

    from mplug2.tokenizer import load_tokenizer

    spec = get_task(task)

    def read(name: str) -> bytes | None:          # a file exported beside the model, if there
        url = storage.join(model_dir, name)
        return storage.read_bytes(url) if storage.exists(url) else None

    raw_cfg = read("config.yaml")
    if raw_cfg is None:
        raise ValueError("the model folder has no config.yaml: pass an exported model folder (<run>/best or final)")
    mcfg = MPLUG2Config.from_dict(yaml.safe_load(raw_cfg))
    fields = spec.import_fields(read)
    opts = {**fields.pop("task_options", {}), **(options or {})}   # what the export recorded, then the caller's
    extra = {"label_key": label_key} if label_key is not None else {}
    cfg = TrainConfig(run_name="evaluate", task=task, model=mcfg.to_dict(), task_options=opts, **extra, **fields)
    tok = load_tokenizer(mcfg.tokenizer)
    module = build_task(cfg, mcfg, tok, world_size=1)
    report = load_init(module, model_dir)
    module.eval()
    return ExportedTask(module, tok, cfg, report)
