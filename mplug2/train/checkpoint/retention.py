"""Which checkpoints of a run count: the ``step_*`` folders, the newest valid one, the ``keep_last`` kept."""

from __future__ import annotations

import logging
from typing import Iterable

from mplug2 import storage
from mplug2.train.checkpoint.commit import checkpoint_problems
from mplug2.train.checkpoint.layout import STEP_PREFIX

log = logging.getLogger("mplug2.train.checkpoint")


def list_step_checkpoints(run_dir: str) -> list[str]:
    """Every ``step_NNNNNNNN`` folder under a run directory, oldest first (names sort by step)."""
    try:
        names = sorted(storage.list_names(run_dir))
    except FileNotFoundError:
        return []
    return [storage.join(run_dir, n) for n in names if n.startswith(STEP_PREFIX)]


def find_latest_valid(checkpoints: Iterable[str]) -> str | None:
    """The valid checkpoint with the highest step (ties: later in the list); invalid ones are skipped with a
    warning naming what is wrong."""
    best: tuple[int, int, str] | None = None
    for i, directory in enumerate(checkpoints):
        problems, manifest = checkpoint_problems(directory)
        if problems:
            log.warning("skipping checkpoint %s: %s", directory, "; ".join(problems))
            continue
        key = (int(manifest["step"]), i, directory)
        if best is None or key > best:
            best = key
    if best is None:
        log.warning("no valid checkpoint found")
        return None
    log.info("latest valid checkpoint: %s (step %d)", best[2], best[0])
    return best[2]


def prune_checkpoints(run_dir: str, keep_last: int, below_step: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` step folders of a run (call once every upload ended), looking
    only at steps below ``below_step`` when given (a newer one is still being written); returns the folders
    removed."""
    found = list_step_checkpoints(run_dir)
    if below_step is not None:
        steps = {d: d.rstrip("/").rsplit("/", 1)[-1][len(STEP_PREFIX):] for d in found}
        found = [d for d in found if steps[d].isdigit() and int(steps[d]) < below_step]
    old = found[:-keep_last] if keep_last > 0 else []
    for directory in old:
        storage.remove_tree(directory)
    return old
