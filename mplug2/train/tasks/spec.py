"""What a training task is (:class:`TaskSpec`), what its evaluation receives (:class:`EvalContext`), and the
gathering every data-parallel evaluation shares: each rank scores its slice of the eval corpus and the pieces
are gathered, so every rank reports the numbers a single process would."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.train.evalset import EvalSet

# Builders and validators receive the run's ``mplug2.train.config.TrainConfig`` (which imports the registry
# to check ``task`` and ``task_options``; annotated ``RunConfig`` here so the two modules do not know each other).
RunConfig = Any

__all__ = ["RunConfig", "EvalContext", "TaskSpec", "parse_options", "rank_and_world", "gather", "by_position"]


@dataclass
class EvalContext:
    """What an evaluation needs besides the task module and the data."""

    tokenizer: Any
    max_text_len: int = 30
    device: torch.device | None = None
    batch_size: int = 32
    options: Any = None             # the task's typed options (TaskSpec.options_type)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    build: Callable[[RunConfig, MPLUG2, Any, int], nn.Module]
    evaluate: Callable[[nn.Module, EvalSet, EvalContext], dict[str, float]] | None = None
    # Tunes an inference setting of the task module on the validation corpus (``data.val``) before each
    # evaluation, so that nothing is chosen on the eval corpus; returns what it chose and measured. The
    # setting travels with the export (export_files / import_fields).
    calibrate: Callable[[nn.Module, EvalSet, EvalContext], dict[str, float]] | None = None
    options_type: type = dict
    validate: Callable[[RunConfig], None] = lambda cfg: None
    # files written beside the exported model (name -> bytes), and config fields read back from them
    export_files: Callable[[nn.Module], dict[str, bytes]] = lambda task: {}
    import_fields: Callable[[Callable[[str], bytes | None]], dict[str, Any]] = lambda read: {}
    uses_every_parameter: bool = False   # DDP may skip the unused-parameter search (all-video pretraining)
    # Tasks whose data are not shard corpora (text-only): their own train loader (cfg, tokenizer, rank, world)
    # and eval data (cfg, path, rank, world); None: the shard loader and mplug2.train.evalset.
    train_loader: Callable[[RunConfig, Any, int, int], Any] | None = None
    load_eval: Callable[[RunConfig, str, int, int], Any] | None = None
    preflight: Callable[[RunConfig], None] = lambda cfg: None   # driver-side data checks before workers start

    def options(self, raw: dict[str, Any] | None) -> Any:
        """The typed options from a run's ``task_options`` (unknown keys are an error)."""
        return parse_options(self.name, self.options_type, raw)


def parse_options(task: str, options_type: type, raw: dict[str, Any] | None) -> Any:
    """``options_type`` from a run's ``task_options`` (unknown keys are an error; ``dict``: the task takes none)."""
    raw = dict(raw or {})
    if options_type is dict:
        if raw:
            raise ValueError(f"task {task!r} takes no task_options, got {sorted(raw)}")
        return {}
    names = {f.name for f in dataclasses.fields(options_type)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"task {task!r}: unknown task_options {unknown}; known: {sorted(names)}")
    return options_type(**raw)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without torch.distributed). Tensors travel on the CPU."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def by_position(parts: list[tuple[list[int], list[Any]]]) -> list[Any]:
    """Merge per-rank ``(positions, values)`` into manifest order."""
    pairs = sorted(((p, v) for pos, vals in parts for p, v in zip(pos, vals)), key=lambda pv: pv[0])
    return [v for _, v in pairs]
