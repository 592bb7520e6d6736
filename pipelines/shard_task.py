"""The work of one output shard: fetch + decode every row, then write and commit the shard.

This runs inside one local process per shard (``--executor local``; the Ray Data path cuts the same work
into stages, :mod:`pipelines.shard_stages`, and commits with :func:`write_and_commit`); it never
raises for a bad *sample*: every row ends as a sample or as a parquet row with a failure reason.
Image rows: downloads run on ``threads`` I/O threads and decode/resize/encode on one thread per task
CPU, fed through a bounded queue (img2dataset's split). Video rows run whole on a small thread pool.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from pipelines import shards
from pipelines.lease import LeaseError, lease_owner_ok
from pipelines.config import PreprocessConfig
from pipelines.errors import INTERNAL_ERROR, RETRYABLE, TIMEOUT, SampleError
from pipelines.rows import RowOutcome, RowProcessor, fail_record, internal_outcome
from pipelines.sources import SOURCE_BOX, ColumnMap, Item, RawRow, normalize_row

log = logging.getLogger(__name__)


@dataclass
class ShardTask:
    """What the driver ships to a worker: the shard id and its manifest rows (row r -> key shard_r)."""

    shard: int
    rows: list[RawRow] = field(default_factory=list)
    column_maps: dict[str, ColumnMap] = field(default_factory=dict)
    retry_failed: bool = False  # rebuild a committed shard, re-fetching only retryable failures
    lease_owner: str | None = None
    commit_not_before: float = 0.0  # wall clock: the lease's settle time when the driver had not confirmed it
    hold_if_all_failed: bool = False  # no row of the run succeeded yet: if none of ours does, do not commit
    force_commit: bool = False  # a held shard run again once other rows of the run succeeded


# ---------------------------------------------------------------------------------------------- shard
def worker_init() -> None:
    """Initializer of the local executor's worker processes: once the pool tells a worker to stop (all
    its tasks are done and committed), flush logs and leave without tearing the interpreter down module
    by module, which took 0.4-0.8 s per worker (measured) that the driver's exit waited for."""
    import atexit

    def _leave() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing left to flush
                pass
        os._exit(0)

    atexit.register(_leave)


def warm_up() -> None:
    """Import what every shard task needs, so a freshly started worker is ready before the first shard."""
    import pyarrow.parquet  # noqa: F401  (the shard's parquet sidecar)
    import urllib3  # noqa: F401
    from PIL import Image, JpegImagePlugin  # noqa: F401


def worker_threads(config: PreprocessConfig) -> int:
    return config.threads if config.modality == "image" else max(1, min(config.threads, 4))


def run_shard(config_dict: dict, task: ShardTask) -> dict:
    """Process and commit one shard; return its stats. Raises only for whole-shard problems
    (storage errors, a lost lease), which the driver retries up to ``max_shard_retry``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = PreprocessConfig.from_dict(config_dict)
    out = shards.Output(config.output)
    t0 = time.time()
    proc = RowProcessor(config, media_root=config.media_root)
    outcomes: list[RowOutcome] = []
    quarantine: list[str] = []
    try:
        if task.retry_failed:
            outcomes, quarantine = retry_outcomes(config, out, task, proc)
        elif config.modality == "image":
            outcomes = image_outcomes(config, task, proc)
        else:
            with ThreadPoolExecutor(worker_threads(config)) as pool:
                futures = [pool.submit(proc.process, task.shard, r, row, task.column_maps[row.source])
                           for r, row in enumerate(task.rows)]
                for fut in futures:
                    outcomes.extend(fut.result())
    finally:
        proc.fetcher.close()
    return write_and_commit(config, out, task, outcomes, t0, quarantine)


def cpu_threads(config: PreprocessConfig) -> int:
    """Decode/resize/encode threads of an image shard task: one per CPU the task is given, plus one, so
    one thread's GIL-holding Python work overlaps another's GIL-free Pillow work (measured: same CPU
    per image as one thread, lower wall time when the machine is shared)."""
    return max(1, math.ceil(config.task_cpus)) + 1


def image_outcomes(config: PreprocessConfig, task: ShardTask, proc: RowProcessor,
                   check_time: Callable[[], float] | None = None) -> list[RowOutcome]:
    """Fetch on ``config.threads`` I/O threads, decode/resize/encode on :func:`cpu_threads` threads.

    Downloads run ahead of the CPU stage by at most ``2 x threads`` rows (bounded memory: a fetched row
    waits in a queue until a CPU thread takes it). Outcomes are sorted by key before writing, so the
    order in which rows finish never shows in the shard. ``check_time`` (the Ray Data path's shard
    deadline, :meth:`pipelines.shard_stages.ShardWork.check_time`) is called while a CPU thread waits
    for a row: it returns the seconds left or raises, which abandons the shard's queued downloads.
    """
    n = len(task.rows)
    if n == 0:
        return []
    ready: queue.SimpleQueue = queue.SimpleQueue()
    window = threading.BoundedSemaphore(max(2 * config.threads, 8))
    outcomes: list[RowOutcome] = []

    stop = threading.Event()

    def fetch(r: int, row: RawRow) -> None:
        while not window.acquire(timeout=0.5):  # released by the CPU stage once it has taken a row
            if stop.is_set():  # the CPU stage died: do not block the pool's shutdown
                return
        key = shards.make_key(task.shard, r)
        try:
            item = normalize_row(row.values, task.column_maps[row.source], config.modality,
                                 config.allow_empty_caption)
        except SampleError as exc:
            ready.put(RowOutcome(key, fail_record(proc.base_record(key, row, None, task.column_maps[row.source]), exc,
                                                  0)))
            return
        except Exception as exc:  # a bug, not a bad sample
            ready.put(internal_outcome(proc, key, row, None, exc))
            return
        try:
            ready.put(proc.image_fetch(key, row, item))
        except Exception as exc:
            ready.put(internal_outcome(proc, key, row, item, exc))

    def take() -> object:
        if check_time is None:
            return ready.get()
        while True:
            try:
                return ready.get(timeout=min(check_time(), 1.0))
            except queue.Empty:
                continue

    def consume(count: int) -> list[RowOutcome]:
        mine = []
        for _ in range(count):
            got = take()
            window.release()
            if isinstance(got, RowOutcome):
                mine.append(got)
                continue
            try:
                mine.append(proc.image_finish(got))
            except Exception as exc:
                mine.append(internal_outcome(proc, got.key, got.row, got.item, exc))
        return mine

    cpu = min(cpu_threads(config), n)
    shares = [n // cpu + (i < n % cpu) for i in range(cpu)]
    with ThreadPoolExecutor(min(config.threads, n), thread_name_prefix="fetch") as io_pool:
        fetches = [io_pool.submit(fetch, r, row) for r, row in enumerate(task.rows)]
        try:
            if cpu == 1:
                outcomes = consume(n)
            else:
                with ThreadPoolExecutor(cpu - 1, thread_name_prefix="cpu") as cpu_pool:
                    others = [cpu_pool.submit(consume, k) for k in shares[1:]]
                    outcomes = consume(shares[0])
                    for f in others:
                        outcomes.extend(f.result())
        except BaseException:
            stop.set()
            for f in fetches:
                f.cancel()
            raise
        for f in fetches:
            f.result()
    return outcomes


def retry_outcomes(config: PreprocessConfig, out: shards.Output, task: ShardTask,
                    proc: RowProcessor) -> tuple[list[RowOutcome], list[str]]:
    """Rebuild a committed shard: keep successes (bytes copied from the old tar) and permanent
    failures, re-fetch rows whose reason is retryable. Keys never change.

    A row that times out again after a retry goes to the shard's quarantine list (hangs on corrupt
    media repeat); quarantined rows are not fetched by later retries.
    """
    import io

    import pyarrow.parquet as pq

    old_rows = pq.read_table(io.BytesIO(out.read_bytes(shards.shard_name(config.split, task.shard, ".parquet")))
                             ).to_pylist()
    old_samples = shards.read_tar(out.read_bytes(shards.shard_name(config.split, task.shard, ".tar")))
    old_stats = out.read_json(shards.shard_name(config.split, task.shard, "_stats.json")) or {}
    quarantine = set(old_stats.get("quarantine", []))
    keep: list[RowOutcome] = []
    redo: list[dict] = []
    for rec in old_rows:
        if rec["status"] == "success":
            keep.append(RowOutcome(rec["key"], rec, old_samples[rec["key"]]))
        elif rec["error_reason"] in RETRYABLE and rec["key"] not in quarantine:
            redo.append(rec)
        else:
            keep.append(RowOutcome(rec["key"], rec))

    def again(rec: dict) -> RowOutcome:
        fixed = {n for n, _ in shards.PARQUET_COLUMNS} | {"captions"}
        extras = {k: v for k, v in rec.items() if k not in fixed}
        extras.pop(SOURCE_BOX, None)
        item = Item(url=rec["url"], captions=list(rec.get("captions") or []), label=rec.get("label"),
                    extras=extras, box=tuple(rec[SOURCE_BOX]) if rec.get(SOURCE_BOX) else None)
        clip = (rec["clip_start"], rec["clip_end"]) if rec.get("clip_start") is not None else None
        row = RawRow(source=rec["source"], source_index=rec["source_index"], values={})
        try:
            o = proc.retry_item(rec["key"], row, item, clip)
        except Exception as exc:
            err = SampleError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            o = RowOutcome(rec["key"], fail_record(dict(rec), err, 1))
        o.record["attempts"] = int(rec.get("attempts") or 0) + int(o.record.get("attempts") or 1)
        if rec.get("clip_index") is not None:
            o.record["clip_index"] = rec["clip_index"]
        return o

    with ThreadPoolExecutor(worker_threads(config)) as pool:
        redone = list(pool.map(again, redo))
    log.info("shard %d: retried %d rows, %d now succeed", task.shard, len(redo),
             sum(o.fields is not None for o in redone))
    for old, new in zip(redo, redone):
        if old["error_reason"] == TIMEOUT and new.record.get("error_reason") == TIMEOUT:
            quarantine.add(new.key)
    return keep + redone, sorted(quarantine)


def write_and_commit(config: PreprocessConfig, out: shards.Output, task: ShardTask,
                      outcomes: list[RowOutcome], t0: float, quarantine: list[str] | None = None) -> dict:
    outcomes.sort(key=lambda o: o.key)
    samples = {o.key: o.fields for o in outcomes if o.fields is not None}
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    for o in outcomes:
        if o.record["status"] != "success":
            failures[o.record["error_reason"]] = failures.get(o.record["error_reason"], 0) + 1
            examples.setdefault(o.record["error_reason"], str(o.record.get("error_message") or "")[:200])
    if task.hold_if_all_failed and outcomes and not samples:  # likely a wrong set-up: the driver decides
        return {"held": True, "count": len(outcomes), "failures": dict(sorted(failures.items())),
                "examples": examples}
    staging = out.staging_dir()
    try:
        tar_path = os.path.join(staging, shards.shard_name(config.split, task.shard, ".tar"))
        info = shards.write_tar(tar_path, samples)
        types = {k: t for cm in task.column_maps.values() for k, t in cm.extra_types.items()}
        parquet = shards.parquet_bytes([o.record for o in outcomes], types)
        del samples
        input_rows = len({(o.record["source"], o.record["source_index"]) for o in outcomes})
        stats = {
            "format_version": shards.FORMAT_VERSION, "shard": task.shard,
            "name": shards.shard_name(config.split, task.shard), "count": len(outcomes), "input_rows": input_rows,
            "successes": info.nsamples, "nsamples": info.nsamples, "failures": dict(sorted(failures.items())),
            "retryable_failures": sum(1 for o in outcomes if o.record.get("error_reason") in RETRYABLE
                                      and o.key not in set(quarantine or ())),
            "quarantine": list(quarantine or []),
            "bytes": info.bytes, "sha256": info.sha256, "md5": info.md5,
            "config_fingerprint": config.fingerprint(), "start_time": t0, "end_time": time.time(),
            "duration": round(time.time() - t0, 3), "retried": task.retry_failed,
        }
        wait = task.commit_not_before - time.time()
        if wait > 0:  # submitted before the driver confirmed the lease: check ownership after it settled
            time.sleep(wait)
        if task.lease_owner and not lease_owner_ok(config.output, task.lease_owner):
            raise LeaseError(f"shard {task.shard}: writer lease lost, not committing")
        if task.retry_failed:  # uncommit first (marker, then tar): a crash mid-rewrite leaves it to be redone
            out.delete(shards.shard_name(config.split, task.shard, "_stats.json"))
            out.delete(shards.shard_name(config.split, task.shard, ".tar"))
        shards.commit_shard(out, config.split, task.shard, tar_path, parquet, stats)
        return stats
    finally:
        shutil.rmtree(staging, ignore_errors=True)
