"""The task registry: every training task in one table, looked up by name by the config, the loop, the CLI
and evaluation (no string dispatch elsewhere). Each task's module here (``retrieval.py``, ``qa.py``, ...) defines
its ``SPEC``; ``spec.py`` says what a spec holds.

A :class:`TaskSpec` says how a task is built (the module whose ``forward(batch)`` returns the loss and whose
methods predict), how it is evaluated on a held-out corpus, its typed options (``task_options:`` in the run
YAML), which config fields it requires, and what its export carries besides the bare model. Evaluation is
data-parallel: each rank scores its slice of the eval corpus (:func:`mplug2.train.evalset.load_eval_set`) and
the pieces are gathered, so every rank reports the numbers a single process would.
"""

from __future__ import annotations

from mplug2.train.tasks import caption, classify, grounding, pretrain, qa, retrieval, text_classify
from mplug2.train.tasks.grounding import GroundingOptions
from mplug2.train.tasks.qa import QAOptions
from mplug2.train.tasks.retrieval import RetrievalOptions
from mplug2.train.tasks.spec import EvalContext, TaskSpec, gather
from mplug2.train.tasks.text_classify import TextClassifyOptions

__all__ = ["TaskSpec", "EvalContext", "REGISTRY", "get_task", "task_names", "calibrated_tasks", "describe_tasks",
           "gather",
           "RetrievalOptions", "QAOptions", "GroundingOptions", "TextClassifyOptions"]

# One module per task, each defining its SPEC; this table's order is the order `--help` lists them in.
REGISTRY: dict[str, TaskSpec] = {m.SPEC.name: m.SPEC for m in (
    pretrain, retrieval, caption, qa, classify, grounding, text_classify)}


def task_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def calibrated_tasks() -> tuple[str, ...]:
    """The tasks that tune an inference setting on a validation corpus (``data.val``)."""
    return tuple(name for name, spec in REGISTRY.items() if spec.calibrate is not None)


def get_task(name: str) -> TaskSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"task must be one of {task_names()}, got {name!r}") from None


def describe_tasks(finetune_only: bool = True) -> str:
    """One line per task, for ``--help``."""
    return "\n".join(f"  {s.name:13s} {s.summary}" for s in REGISTRY.values()
                     if not (finetune_only and s.evaluate is None))
