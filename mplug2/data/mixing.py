"""Several corpora, one batch stream: a per-step corpus schedule shared by every rank (``training-and-ops.md`` §2.2).

The corpus of global micro-batch ``s`` is drawn with the mixture weights from an RNG seeded by ``(seed, s)``,
so all ranks pick the same corpus at the same step without communicating, and resuming at step ``s`` needs
only ``s``. Batches are homogeneous (one corpus each): image (T=1) and video tensors differ in shape, and
ITC gathers and DDP/FSDP2 need the same shapes and modules on every rank. Each corpus keeps its own stream,
cursor and epoch count.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import Counter
from typing import Any, Iterator, Mapping, Protocol

from mplug2.data.stream import derive_seed

log = logging.getLogger(__name__)

__all__ = ["MixtureSchedule", "MixedLoader"]


class _StatefulLoader(Protocol):
    def __next__(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MixtureSchedule:
    """``corpus_at(step)``: which corpus global micro-batch ``step`` comes from."""

    def __init__(self, weights: Mapping[str, float], seed: int = 0) -> None:
        if not weights:
            raise ValueError("a mixture needs at least one corpus")
        bad = {k: w for k, w in weights.items() if not (w >= 0)}
        if bad or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.names = sorted(weights)          # sorted: independent of dict order in configs
        total = float(sum(weights.values()))
        acc, self._cum = 0.0, []
        for name in self.names:
            acc += weights[name] / total
            self._cum.append(acc)
        self._cum[-1] = 1.0
        self.weights = {n: weights[n] / total for n in self.names}
        self.seed = seed

    def corpus_at(self, step: int) -> str:
        u = random.Random(derive_seed(self.seed, "mixture", step)).random()
        return self.names[bisect.bisect_right(self._cum, u)]

    def counts(self, start: int, stop: int) -> Counter:
        """How many of steps ``[start, stop)`` each corpus serves (for logs and step planning)."""
        return Counter(self.corpus_at(s) for s in range(start, stop))


class MixedLoader:
    """Yield batches following a :class:`MixtureSchedule`; ``state_dict`` holds the step and every cursor."""

    def __init__(self, loaders: Mapping[str, _StatefulLoader], weights: Mapping[str, float], *, seed: int = 0) -> None:
        if set(loaders) != set(weights):
            raise ValueError(f"loaders {sorted(loaders)} and weights {sorted(weights)} name different corpora")
        self.loaders = dict(loaders)
        self.schedule = MixtureSchedule(weights, seed)
        self.step = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        name = self.schedule.corpus_at(self.step)
        batch = next(self.loaders[name])
        self.step += 1
        return batch

    @property
    def damaged_samples(self) -> int:
        """Samples skipped as unreadable so far, over every corpus (mplug2.data.damage)."""
        return sum(loader.damage.total for loader in self.loaders.values() if hasattr(loader, "damage"))

    def damage_report(self) -> str:
        """One line per corpus with damaged shards, for the run summary ("" when none)."""
        return "\n".join(f"{name}: {loader.damage.total} damaged samples skipped in {loader.damage.describe()}"
                         for name, loader in sorted(self.loaders.items())
                         if getattr(loader, "damage", None) is not None and loader.damage.total)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.schedule.weights, "seed": self.schedule.seed,
                "corpora": {n: l.state_dict() for n, l in sorted(self.loaders.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["corpora"]) != set(self.loaders):
            raise ValueError(f"saved corpora {sorted(state['corpora'])} differ from {sorted(self.loaders)}")
        saved_w = {k: round(v, 12) for k, v in state["weights"].items()}
        if saved_w != {k: round(v, 12) for k, v in self.schedule.weights.items()} or state["seed"] != self.schedule.seed:
            raise ValueError("mixture weights or seed changed since the checkpoint; the schedule would differ")
        for name, sub in state["corpora"].items():
            self.loaders[name].load_state_dict(sub)
        self.step = int(state["step"])
        log.info("mixture resumed at step %d (%s)", self.step,
                 ", ".join(f"{n}: epoch {s['epoch']} batch {s['batches']}" for n, s in state["corpora"].items()))

    def close(self) -> None:
        for l in self.loaders.values():
            close = getattr(l, "close", None)
            if close:
                close()
