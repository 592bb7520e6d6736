"""The run: stream the plan's shards through an executor, retry whole-shard failures by error type,
enforce the per-shard deadline and the global watchdog, and commit the dataset.

Two executors: the local process pool (one task per shard, bounded concurrency, :func:`_drive_pool`) and
Ray Data (stages per shard, fed in windows, :func:`_drive_stream`). Why shards and not
``Dataset.write_webdataset``: shard names must be deterministic (``train-000012.tar`` owns input rows
``[12·S, 13·S)``), each shard is committed as a unit with its sidecars, and resume/retry are
shard-granular (data-contract §8, §10).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from mplug2.runtime import setup_process_env
from pipelines import shards
from pipelines.lease import WriterLease
from pipelines.config import PreprocessConfig
from mplug2.storage import StorageUnavailableError
from pipelines.errors import shard_error_is_retryable
from pipelines.executors import choose_executor
from pipelines.executors.local import LocalExecutor
from pipelines.executors.ray_data import RayDataExecutor, window_size
from pipelines.plan import Prepared, manifest_records, prepare
from pipelines.shard_stages import ShardWork
from pipelines.shard_task import ShardTask
from pipelines.summary import RunSummary

log = logging.getLogger(__name__)


def _prepare_beside_ray(config: PreprocessConfig, out: shards.Output, fp: str,
                        summary: RunSummary) -> tuple[Prepared, RayDataExecutor]:
    """Start Ray (seconds: a local cluster, or a connection) on this thread while start-up checks and
    planning run on a side thread. ``ray.init`` stays on the main thread (it installs a SIGTERM handler
    there). If either side fails, the other is cleaned up (lease released / Ray shut down)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="plan") as side:
        planned = side.submit(prepare, config, out, fp, summary)
        try:
            executor = RayDataExecutor(config)
        except BaseException:
            try:
                planned.result().lease.release()
            except BaseException:  # the planning error, if any, matters less than Ray's
                pass
            raise
        try:
            return planned.result(), executor
        except BaseException:
            executor.close()
            raise


def preprocess(config: PreprocessConfig) -> RunSummary:
    """Preprocess ``config.manifest`` into WebDataset shards under ``config.output``; see module doc."""
    setup_process_env()
    t0 = time.monotonic()
    config.validate()
    fp = config.fingerprint()
    out = shards.Output(config.output)
    summary = RunSummary(output=out.url, mode=config.mode + (" +retry-failed" if config.retry_failed else ""),
                         fingerprint=fp, max_failure_ratio=config.max_failure_ratio,
                         allow_all_failed=config.allow_all_failed)
    try:
        return _preprocess(config, out, fp, summary, t0)
    except StorageUnavailableError as exc:  # past the retry deadline: report, never a traceback
        log.error("storage unavailable: %s", exc)
        summary.storage_error = str(exc)
        summary.wall_s = time.monotonic() - t0
        return summary


def _preprocess(config: PreprocessConfig, out: shards.Output, fp: str, summary: RunSummary,
                t0: float) -> RunSummary:
    kind = choose_executor(config)
    log.info("executor: %s%s", kind, " (auto)" if config.executor == "auto" else "")
    executor = None
    if kind == "ray":
        prep, executor = _prepare_beside_ray(config, out, fp, summary)
    else:
        executor = LocalExecutor(config)  # its workers start while the driver plans
        try:
            prep = prepare(config, out, fp, summary)
        except BaseException:
            executor.close()
            raise
    lease, prev, existing, pending, first = prep.lease, prep.prev, prep.existing, prep.pending, prep.first
    try:
        config_dict = config.to_dict()
        if first is not None:
            writes_plan = config.mode == "extend" and not pending
            # The lease settles (WriterLease.confirm) while the first shards already run when that is
            # safe: each shard task waits out the settle delay itself before its commit-time lease check,
            # so no shard commits earlier than before (on a running Ray cluster the 1 s settle delay
            # otherwise left every CPU idle at the start of the run). An extend must store its plan before
            # any shard can commit.
            early = not writes_plan
            if not early:
                lease.confirm()
                if writes_plan:
                    out.write_bytes(shards.PENDING_EXTEND, shards.canonical_json(
                        {"start_shard": prep.start_shard, "skip": prep.skip, "config_fingerprint": fp,
                         "owner": lease.owner}))
            if isinstance(executor, RayDataExecutor):
                _drive_stream(config, executor, first, prep.tasks, lease, summary, t0, unconfirmed=early)
            else:
                _drive_pool(config, config_dict, executor, first, prep.tasks, lease, summary, t0, unconfirmed=early)
            _settle_held(config, config_dict, executor, lease, summary, t0)
        else:
            for _ in prep.tasks:  # pragma: no cover - nothing left after the first None
                pass

        summary.shards_written.sort()
        wrote = bool(summary.shards_written)
        if wrote or (prev is None and existing) or pending:
            lease.confirm()
            all_stats = shards.committed_stats(out, config.split)
            manifests = manifest_records(prep.plan.manifests, prev, config.mode)
            summary.dataset = shards.finalize_dataset(
                out, config.split, config=config.to_dict(), fingerprint=fp, manifests=manifests, stats=all_stats,
                extended=prep.extended or (config.mode == "extend" and prep.start_shard > 0))
        else:
            summary.dataset = prev
            log.info("nothing new to write; dataset files left as they are")
        if config.mode == "extend" and (pending or first is not None) and not summary.shards_failed \
                and not summary.watchdog_fired:
            out.delete(shards.PENDING_EXTEND)
    finally:
        if executor is not None:
            executor.close()
        lease.release()
    summary.shards_written.sort()
    summary.shards_skipped.sort()
    summary.wall_s = time.monotonic() - t0
    return summary


def _drive_pool(config: PreprocessConfig, config_dict: dict, executor, first: ShardTask, tasks: Iterator[ShardTask],
           lease: WriterLease, summary: RunSummary, t0: float, unconfirmed: bool = False) -> None:
    """Submit shard tasks with bounded concurrency; collect, retry, time out, report progress.

    ``unconfirmed``: the lease has not settled yet; tasks are submitted with ``commit_not_before`` (they
    wait out the settle delay before their commit-time lease check) and the lease is confirmed once the
    first tasks run (a lost lease raises :class:`~pipelines.lease.LeaseError` here; no shard commits).
    """
    from tqdm import tqdm

    max_in_flight = config.max_in_flight or max(2, int(2 * executor.cpus / getattr(config, "task_cpus", 1.0)))
    in_flight: dict[Any, tuple[ShardTask, float, int]] = {}  # handle -> (task, started, attempt)
    pending_retry: list[tuple[ShardTask, int]] = []
    next_task: ShardTask | None = first
    bar = tqdm(unit="sample", desc="shards 0", disable=not config.progress, dynamic_ncols=True, mininterval=1.0)
    done_shards = 0

    def submit(task: ShardTask, attempt: int) -> None:
        _set_hold(config, task, summary)
        if unconfirmed:
            task.commit_not_before = lease.settles_at
        in_flight[executor.submit(config_dict, task)] = (task, time.monotonic(), attempt)

    try:
        while True:
            while len(in_flight) < max_in_flight and not summary.watchdog_fired:
                if pending_retry:
                    submit(*pending_retry.pop(0))
                elif next_task is not None:
                    submit(next_task, 1)
                    next_task = next(tasks, None)
                else:
                    break
            if not in_flight:
                break
            if unconfirmed:
                lease.confirm()
                unconfirmed = False
            done = executor.wait(list(in_flight), timeout=1.0)
            now = time.monotonic()
            for h in done:
                task, _, attempt = in_flight.pop(h)
                try:
                    stats = executor.result(h)
                except Exception as exc:  # whole-shard failure: storage, lost lease, dead worker
                    why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    _shard_failed(task, attempt, why, shard_error_is_retryable(exc), config, pending_retry,
                                  summary)
                    continue
                if _held(task, stats, summary):
                    continue
                done_shards += 1
                _record(task, stats, summary)
                bar.update(stats["count"])
                bar.set_description(f"shards {done_shards}")
                bar.set_postfix(ok=summary.successes, failed=summary.failed,
                                sps=f"{summary.successes / max(1e-9, now - t0):.0f}")
            for h, (task, started, attempt) in list(in_flight.items()):
                if now - started > config.shard_timeout_s:
                    executor.cancel(h)
                    in_flight.pop(h)
                    why = f"past the per-shard deadline of {config.shard_timeout_s}s"
                    if not executor.can_kill:  # never let a retry race the still-running first attempt
                        summary.shards_failed[task.shard] = why + " (local executor: not retried)"
                        continue
                    _shard_failed(task, attempt, why, True, config, pending_retry, summary)
            if config.watchdog_s and now - t0 > config.watchdog_s and not summary.watchdog_fired:
                log.error("watchdog: %.0fs elapsed, cancelling %d running shards", now - t0, len(in_flight))
                summary.watchdog_fired = True
                for h, (task, _, _) in list(in_flight.items()):
                    executor.cancel(h)
                    summary.shards_failed[task.shard] = "cancelled by the global watchdog"
                in_flight.clear()
                pending_retry.clear()
                break
            lease.renew()
    finally:
        bar.close()


def _settle_held(config: PreprocessConfig, config_dict: dict, executor, lease: WriterLease,
                 summary: RunSummary, t0: float) -> None:
    """Shards held back because every row failed: if some row of the run succeeded, they are real (dead
    links) and run again to commit; if none did, the set-up is wrong: count them, commit nothing."""
    held, summary.held = summary.held, []
    if not held:
        return
    if summary.successes == 0:
        for _task, stats in held:
            summary.rows += stats["count"]
            for r, n in stats["failures"].items():
                summary.failures[r] = summary.failures.get(r, 0) + n
            for r, msg in stats.get("examples", {}).items():
                summary.failure_examples.setdefault(r, msg)
        return
    if summary.watchdog_fired:
        for task, _stats in held:
            summary.shards_failed[task.shard] = "every row failed; not committed before the global watchdog fired"
        return
    log.info("%d shard(s) where every row failed: committing them now that other rows succeeded", len(held))
    tasks = [task for task, _ in held]
    for t in tasks:
        t.force_commit = True
    if isinstance(executor, RayDataExecutor):
        _drive_stream(config, executor, tasks[0], iter(tasks[1:]), lease, summary, t0)
    else:
        _drive_pool(config, config_dict, executor, tasks[0], iter(tasks[1:]), lease, summary, t0)


def _set_hold(config: PreprocessConfig, task: ShardTask, summary: RunSummary) -> None:
    """Until one row of the run succeeds, a shard where every row failed is held back, not committed."""
    task.hold_if_all_failed = not (config.allow_all_failed or summary.successes or task.retry_failed
                                   or task.force_commit)


def _held(task: ShardTask, stats: dict, summary: RunSummary) -> bool:
    if not stats.get("held"):
        return False
    summary.held.append((task, stats))
    log.warning("shard %d: every row failed (%s); held back until a row of the run succeeds", task.shard,
                stats["failures"])
    return True


def _shard_failed(task: ShardTask, attempt: int, why: str, retryable: bool, config: PreprocessConfig,
                  pending_retry: list, summary: RunSummary) -> None:
    if retryable and attempt <= config.max_shard_retry:
        log.warning("shard %d failed (attempt %d/%d), retrying: %s", task.shard, attempt,
                    config.max_shard_retry + 1, why)
        pending_retry.append((task, attempt + 1))
    else:
        log.error("shard %d failed for good after %d attempt(s): %s", task.shard, attempt, why)
        summary.shards_failed[task.shard] = why


def _record(task: ShardTask, stats: dict, summary: RunSummary) -> None:
    """Count a committed shard."""
    summary.shards_written.append(task.shard)
    summary.rows += stats["count"]
    summary.successes += stats["successes"]
    for r, n in stats["failures"].items():
        summary.failures[r] = summary.failures.get(r, 0) + n
    log.info("shard %d committed: %d/%d samples in %.1fs", task.shard, stats["successes"], stats["count"],
             stats["duration"])


def _drive_stream(config: PreprocessConfig, executor: RayDataExecutor, first: ShardTask,
                  tasks: Iterator[ShardTask], lease: WriterLease, summary: RunSummary, t0: float,
                  unconfirmed: bool = False) -> None:
    """Feed the plan to the Ray Data pipeline in windows; retry failed shards in the next window.

    Deadlines travel with each shard as wall-clock times, so the stages themselves stop late shards and,
    once the watchdog fires, drain the pipeline: every shard of a window comes back, committed or not.
    ``unconfirmed``: as in :func:`_drive_pool`, the first window's shards carry ``commit_not_before`` and
    the lease is confirmed on the first tick, once the pipeline runs (a lost lease raises
    :class:`~pipelines.lease.LeaseError` here; no shard commits).
    """
    stop_at = time.time() + config.watchdog_s - (time.monotonic() - t0) if config.watchdog_s else None
    retry: list[tuple[ShardTask, int]] = []
    upcoming: ShardTask | None = first
    size = window_size(executor, config)

    def tick() -> None:
        nonlocal unconfirmed
        if unconfirmed:
            lease.confirm()
            unconfirmed = False
        lease.renew()
        if stop_at is not None and time.time() >= stop_at and not summary.watchdog_fired:
            log.error("watchdog: %.0fs elapsed, the pipeline drains what is left", time.monotonic() - t0)
            summary.watchdog_fired = True

    while not summary.watchdog_fired:
        window, retry = retry, []
        while len(window) < size and upcoming is not None:
            window.append((upcoming, 1))
            upcoming = next(tasks, None)
        if not window:
            break
        for task, _ in window:
            _set_hold(config, task, summary)
            if unconfirmed:
                task.commit_not_before = lease.settles_at
        works = [ShardWork(task, attempt, stop_at=stop_at) for task, attempt in window]
        for work in executor.run(works, tick):
            if work.stats is not None and _held(work.task, work.stats, summary):
                continue
            if work.stats is not None:
                _record(work.task, work.stats, summary)
            elif work.watchdog:
                summary.watchdog_fired = True
                summary.shards_failed[work.task.shard] = "cancelled by the global watchdog"
            else:
                _shard_failed(work.task, work.attempt, work.error or "unknown", work.retryable, config, retry,
                              summary)
    summary.stages = executor.stage_summary()
