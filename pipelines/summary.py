"""What a preprocessing run did: counts by outcome and reason, the exit code, and the table the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from mplug2.storage import StorageUnavailableError
from pipelines.errors import (EXIT_BAD_INVOCATION, EXIT_INCOMPLETE, EXIT_OK, EXIT_STORAGE_UNAVAILABLE,
                              EXIT_TOO_MANY_FAILED)


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is what the CLI returns."""

    output: str
    mode: str
    fingerprint: str
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    shards_failed: dict[int, str] = field(default_factory=dict)
    rows: int = 0  # samples attempted in this run (rows, or clips for clip lists)
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    watchdog_fired: bool = False
    max_failure_ratio: float = 1.0
    dataset: dict | None = None
    # Ray Data path: operator -> shards, task_s, wall_s (a fused operator also stages: stage -> shards, task_s)
    stages: dict[str, dict] = field(default_factory=dict)
    allow_all_failed: bool = False
    held: list = field(default_factory=list)  # (task, result) of shards held back: no row succeeded (yet)
    failure_examples: dict[str, str] = field(default_factory=dict)  # reason -> one message
    storage_error: str | None = None  # storage unavailable past the retry deadline
    config_error: str | None = None  # a bad invocation, found before any work

    @property
    def all_failed(self) -> bool:
        """Every attempted sample failed (a wrong column order, --media-root, ids...): nothing committed."""
        return self.rows > 0 and self.successes == 0 and not self.allow_all_failed

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.successes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """One code per kind of outcome (pipelines.errors.EXIT_*), so a scheduler can tell them apart."""
        storage_down = self.storage_error or (self.shards_failed and all(
            StorageUnavailableError.__name__ in why for why in self.shards_failed.values()))
        if self.config_error:
            return EXIT_BAD_INVOCATION
        if storage_down:
            return EXIT_STORAGE_UNAVAILABLE
        if self.shards_failed or self.watchdog_fired:
            return EXIT_INCOMPLETE
        if self.all_failed or self.failure_ratio > self.max_failure_ratio:
            return EXIT_TOO_MANY_FAILED
        return EXIT_OK

    def table(self) -> str:
        lines = [
            f"output            {self.output}",
            f"mode              {self.mode}  (config {self.fingerprint})",
            f"shards            {len(self.shards_written)} written, {len(self.shards_skipped)} skipped "
            f"(committed), {len(self.shards_failed)} failed",
            f"samples           {self.rows} attempted, {self.successes} written, {self.failed} failed "
            f"({100 * self.failure_ratio:.1f}%)",
        ]
        width = max((len(r) for r in self.failures), default=0) + 2  # a long reason never runs into its count
        for reason, n in sorted(self.failures.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<{width}}{n}")
        lines.append(f"wall time         {self.wall_s:.1f} s  ({self.samples_per_s:.1f} samples/s)")
        if self.stages:
            w = max(16, *(len(name) for name in self.stages))  # fused stages: Map(fetch)->Map(decode)->...
            lines.append(f"{'Ray Data stages':<{w + 2}}{'shards':>7}{'task s':>9}{'wall s':>9}{'samples/s':>11}")
            for name, st in self.stages.items():
                rate = self.rows / st["wall_s"] if st["wall_s"] > 0 else 0.0
                lines.append(f"  {name:<{w}}{st['shards']:>7}{st['task_s']:>9.1f}{st['wall_s']:>9.1f}{rate:>11.1f}")
                for stage, sub in st.get("stages", {}).items():  # inside a fused operator: task seconds only
                    lines.append(f"    {stage:<{w - 2}}{sub['shards']:>7}{sub['task_s']:>9.1f}")
        for sid, why in sorted(self.shards_failed.items()):
            lines.append(f"FAILED shard {sid}: {why}")
        if self.watchdog_fired:
            lines.append("WATCHDOG: the global deadline ended the run early")
        if self.failure_ratio > self.max_failure_ratio:
            lines.append(f"failure ratio {self.failure_ratio:.3f} > --max-failure-ratio {self.max_failure_ratio}")
        if self.all_failed:
            top = max(self.failures, key=lambda r: self.failures[r]) if self.failures else "?"
            example = self.failure_examples.get(top, "")
            lines.append(f"EVERY ROW FAILED, nothing committed: mostly {top}" + (f" (e.g. {example})" if example
                         else "") + "; check --column-names / --url-col / --caption-col / --media-root / "
                         "--preset against the manifest (--allow-all-failed commits such shards anyway)")
        if self.storage_error:
            lines.append(f"STORAGE UNAVAILABLE: {self.storage_error}; committed shards are intact, re-run the "
                         "same command to resume once the store answers")
        if self.config_error:
            lines.append(f"ERROR: {self.config_error}")
        return "\n".join(lines)
