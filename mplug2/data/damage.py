"""Damaged training data: skip, count, and fail only past the user's budget.

Real corpora on object storage hold damaged objects (a truncated upload, a garbage tar, an undecodable
JPEG). A multi-day run must not die on one, nor silently train on far less data than it should: each
skipped sample is counted per shard (logged when a shard is first seen damaged, reported in the metrics
and the run summary) and the run stops with a message naming the shards once ``data.max_bad_samples``
or ``data.max_bad_fraction`` is passed. The counts live in the loader state, so a resumed run keeps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

log = logging.getLogger(__name__)

__all__ = ["DamagedDataError", "DamageLedger"]


class DamagedDataError(RuntimeError):
    """More damaged samples than the configured budget."""


@dataclass
class DamageLedger:
    """Skipped samples of one corpus on one rank: per shard, the count and the first reason."""

    corpus: str
    max_bad_samples: int | None = None   # None: no limit on the count
    max_bad_fraction: float = 1.0        # of the samples this rank asked for (read + skipped)
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requested: int = 0

    @property
    def total(self) -> int:
        return sum(int(v["samples"]) for v in self.shards.values())

    def record(self, skipped: Iterable[tuple[str, str]], requested: int) -> None:
        """Add one batch's skips (``(shard, reason)`` per skipped sample) and its requested sample count,
        then enforce the budget."""
        self.requested += requested
        for shard, reason in skipped:
            entry = self.shards.get(shard)
            if entry is None:
                log.warning("corpus %s: damaged data in %s, skipping its unreadable samples: %s", self.corpus,
                            shard, reason)
                entry = self.shards[shard] = {"samples": 0, "reason": reason}
            entry["samples"] += 1
        self.check()

    def check(self) -> None:
        bad = self.total
        over_count = self.max_bad_samples is not None and bad > self.max_bad_samples
        over_fraction = self.requested > 0 and bad / self.requested > self.max_bad_fraction
        if over_count or over_fraction:
            limit = (f"data.max_bad_samples={self.max_bad_samples}" if over_count
                     else f"data.max_bad_fraction={self.max_bad_fraction} ({bad}/{self.requested})")
            raise DamagedDataError(f"corpus {self.corpus}: {bad} damaged samples, past {limit}. Damaged shards: "
                                   f"{self.describe()}. Check them with `mplug2-data verify --output <prefix>`, "
                                   "rewrite or drop them, or raise the budget")

    def describe(self, limit: int = 10) -> str:
        items = sorted(self.shards.items(), key=lambda kv: (-kv[1]["samples"], kv[0]))
        text = "; ".join(f"{name} ({v['samples']} samples: {v['reason']})" for name, v in items[:limit])
        return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")

    def state_dict(self) -> dict[str, Any]:
        return {"shards": {k: dict(v) for k, v in sorted(self.shards.items())}, "requested": self.requested}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.shards = {k: dict(v) for k, v in state.get("shards", {}).items()}
        self.requested = int(state.get("requested", 0))
