"""One shard's work cut into stages for the Ray Data path: fetch → decode → commit for videos,
fetch_decode → commit for images (downloads feed the CPU threads inside one task, as in the local pool).

The unit that flows between stages is a whole shard (:class:`ShardWork`, its rows inside): the commit
stage then sees every row of its shard, so a shard is still written and committed as one unit (tar,
parquet, ``_stats.json`` last), by the same code as the local pool (:func:`pipelines.shard_task.write_and_commit`),
with the same bytes. Nothing here imports Ray: the stages are plain functions of a :class:`ShardWork`.

A stage never raises: a whole-shard failure (storage error, a lost lease, the shard's deadline) is kept
in the work, later stages pass it on untouched, and the driver decides from its type whether to retry.
Deadlines are wall-clock times carried by the work, so every stage, on any node, stops a shard that is
past its own deadline or the run's watchdog, and the whole pipeline drains quickly once the watchdog fires.
"""

from __future__ import annotations

import logging
import pickle
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines import shards
from pipelines.config import PreprocessConfig
from pipelines.errors import PermanentShardError, SampleError, shard_error_is_retryable
from pipelines.rows import RowOutcome, RowProcessor, fail_record, internal_outcome
from pipelines.shard_task import ShardTask, image_outcomes, retry_outcomes, worker_threads, write_and_commit
from pipelines.sources import normalize_row

log = logging.getLogger(__name__)


class ShardDeadline(RuntimeError):
    """The shard ran past ``shard_timeout_s`` (retried: a slow source may answer next time)."""


class WatchdogStop(PermanentShardError):
    """The run's global deadline passed before this shard committed."""


@dataclass
class ShardWork:
    """A shard on its way through the stages."""

    task: ShardTask
    attempt: int = 1
    stop_at: float | None = None  # wall clock: the run's watchdog deadline
    deadline: float | None = None  # wall clock: this shard's deadline, set when its first stage starts
    started: float = 0.0
    fetched: list[Any] = field(default_factory=list)  # per row: a RowOutcome or a fetched row
    outcomes: list[RowOutcome] = field(default_factory=list)
    quarantine: list[str] | None = None
    stats: dict | None = None
    error: str | None = None
    retryable: bool = True
    watchdog: bool = False
    stage_s: dict[str, float] = field(default_factory=dict)  # seconds in each stage (fused operators too)

    def fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        self.retryable = shard_error_is_retryable(exc)
        self.watchdog = isinstance(exc, WatchdogStop)
        self.fetched, self.outcomes = [], []

    def check_time(self) -> float:
        """Raise when the run's watchdog or the shard's deadline has passed; else seconds left (or inf)."""
        now = time.time()
        if self.stop_at is not None and now >= self.stop_at:
            raise WatchdogStop("cancelled by the global watchdog")
        if self.deadline is not None and now >= self.deadline:
            raise ShardDeadline(f"past the per-shard deadline of {self.deadline - self.started:g}s")
        ends = [t for t in (self.stop_at, self.deadline) if t is not None]
        return min(ends) - now if ends else float("inf")


Stage = Callable[[PreprocessConfig, ShardWork], None]


def run_stage(stage: Stage, config_dict: dict, payload: bytes) -> bytes:
    """Apply one stage to a pickled :class:`ShardWork` (the form it travels in between stages)."""
    return run_stages([stage], config_dict, payload)


def run_stages(stages: list[Stage], config_dict: dict, payload: bytes) -> bytes:
    """Apply ``stages`` in turn to a pickled :class:`ShardWork`, unpickled and pickled once: stages that run
    in one task hand the shard (~25 MB of encoded samples for 1,000 images) over in memory."""
    work: ShardWork = pickle.loads(payload)
    config: PreprocessConfig | None = None
    for stage in stages:
        t0 = time.monotonic()
        if work.error is None:
            try:
                if not work.started:
                    work.started = time.time()
                    work.deadline = work.started + float(config_dict["shard_timeout_s"])
                work.check_time()
                config = config or PreprocessConfig.from_dict(config_dict)
                stage(config, work)
            except Exception as exc:  # a whole-shard failure: reported to the driver, not raised into Ray Data
                if not isinstance(exc, (ShardDeadline, WatchdogStop)):
                    log.error("shard %d: %s failed", work.task.shard, stage.__name__, exc_info=exc)
                work.fail(exc)
        work.stage_s[stage.__name__] = work.stage_s.get(stage.__name__, 0.0) + time.monotonic() - t0
    return pickle.dumps(work, protocol=5)


def _map_until(work: ShardWork, fn: Callable, items: list, threads: int) -> list:
    """``[fn(x) for x in items]`` on ``threads`` threads, abandoned (queued items cancelled) at the deadline."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max(1, min(threads, len(items))))
    try:
        futures = [pool.submit(fn, x) for x in items]
        while True:
            _, pending = wait(futures, timeout=min(work.check_time(), 1.0))
            if not pending:
                return [f.result() for f in futures]
    finally:  # on a deadline, running items end by their own timeouts (fetch, video deadline)
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- stages
def fetch(config: PreprocessConfig, work: ShardWork) -> None:
    """I/O: download (or check) every video row's media on :func:`worker_threads` threads."""
    task = work.task
    if task.retry_failed:  # a committed shard's retryable rows are fetched and decoded in `decode`
        return
    proc = RowProcessor(config, media_root=config.media_root)

    def one(r_row) -> Any:
        r, row = r_row
        key = shards.make_key(task.shard, r)
        try:
            item = normalize_row(row.values, task.column_maps[row.source], config.modality,
                                 config.allow_empty_caption)
        except SampleError as exc:
            return RowOutcome(key, fail_record(proc.base_record(key, row, None, task.column_maps[row.source]), exc, 0))
        try:
            return proc.video_fetch(key, row, item)
        except Exception as exc:  # a bug, not a bad sample
            return internal_outcome(proc, key, row, item, exc)

    try:
        work.fetched = _map_until(work, one, list(enumerate(task.rows)), worker_threads(config))
    finally:
        proc.fetcher.close()


def decode(config: PreprocessConfig, work: ShardWork) -> None:
    """CPU: decode, sample frames, resize and encode every fetched video row (or rebuild a committed
    shard under ``--retry-failed``)."""
    proc = RowProcessor(config, media_root=config.media_root)
    try:
        if work.task.retry_failed:
            work.outcomes, work.quarantine = retry_outcomes(config, shards.Output(config.output), work.task, proc)
            return

        def one(f: Any) -> list[RowOutcome]:
            if isinstance(f, RowOutcome):
                return [f]
            try:
                return proc.video_finish(f)
            except Exception as exc:  # a bug, not a bad sample
                return [internal_outcome(proc, f.key, f.row, f.item, exc)]

        work.outcomes = [o for outs in _map_until(work, one, work.fetched, worker_threads(config)) for o in outs]
        work.fetched = []
    finally:
        proc.fetcher.close()


def fetch_decode(config: PreprocessConfig, work: ShardWork) -> None:
    """I/O and CPU in one stage, for image corpora: download threads feed the CPU
    threads inside the task (the local pool's :func:`~pipelines.shard_task.image_outcomes`), so a shard
    crosses the object store once, as encoded samples, instead of also as fetched bytes."""
    proc = RowProcessor(config, media_root=config.media_root)
    try:
        if work.task.retry_failed:
            work.outcomes, work.quarantine = retry_outcomes(config, shards.Output(config.output), work.task, proc)
        else:
            work.outcomes = image_outcomes(config, work.task, proc, check_time=work.check_time)
    finally:
        proc.fetcher.close()


def commit(config: PreprocessConfig, work: ShardWork) -> None:
    """Storage: write the tar and sidecars and commit the shard (``_stats.json`` last), lease checked."""
    work.check_time()  # nothing commits past a deadline the driver has already reported
    work.stats = write_and_commit(config, shards.Output(config.output), work.task, work.outcomes, work.started,
                                  work.quarantine)
    work.outcomes = []
