"""What a preprocessing run did: counts by outcome and reason, the exit code, and the table the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    stages: dict[str, dict] = field(default_factory=dict)  # Ray Data path: operator -> shards, task_s, wall_s

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
        if self.shards_failed or self.watchdog_fired:
            return 2
        return 1 if self.failure_ratio > self.max_failure_ratio else 0

    def table(self) -> str:
        lines = [
            f"output            {self.output}",
            f"mode              {self.mode}  (config {self.fingerprint})",
            f"shards            {len(self.shards_written)} written, {len(self.shards_skipped)} skipped "
            f"(committed), {len(self.shards_failed)} failed",
            f"samples           {self.rows} attempted, {self.successes} written, {self.failed} failed "
            f"({100 * self.failure_ratio:.1f}%)",
        ]
        for reason, n in sorted(self.failures.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<16}{n}")
        lines.append(f"wall time         {self.wall_s:.1f} s  ({self.samples_per_s:.1f} samples/s)")
        if self.stages:
            lines.append(f"{'Ray Data stages':<18}{'shards':>7}{'task s':>9}{'wall s':>9}{'samples/s':>11}")
            for name, st in self.stages.items():
                rate = self.rows / st["wall_s"] if st["wall_s"] > 0 else 0.0
                lines.append(f"  {name:<16}{st['shards']:>7}{st['task_s']:>9.1f}{st['wall_s']:>9.1f}{rate:>11.1f}")
        for sid, why in sorted(self.shards_failed.items()):
            lines.append(f"FAILED shard {sid}: {why}")
        if self.watchdog_fired:
            lines.append("WATCHDOG: the global deadline ended the run early")
        if self.failure_ratio > self.max_failure_ratio:
            lines.append(f"failure ratio {self.failure_ratio:.3f} > --max-failure-ratio {self.max_failure_ratio}")
        return "\n".join(lines)
