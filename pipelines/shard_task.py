"""The work of one output shard: fetch + decode every row, then write and commit the shard.

This runs inside one Ray task per shard (or in a local process for ``--executor local``); it never
raises for a bad *sample*: every row ends as a sample or as a parquet row with a failure reason.
Image rows: downloads run on ``threads`` I/O threads and decode/resize/encode on one thread per task
CPU, fed through a bounded queue (img2dataset's split). Video rows run whole on a small thread pool.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipelines import shards
from pipelines.config import PreprocessConfig
from pipelines.errors import INTERNAL_ERROR, RETRYABLE, TIMEOUT, SampleError
from pipelines.fetch import Fetcher, FetchOptions, non_media_reason, resolve_source
from pipelines.image import ImageOptions, process_image
from pipelines.sources import RESERVED_FIELDS, ColumnMap, Item, RawRow, media_source, normalize_row, row_extras

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


@dataclass
class _ImageFetch:
    """An image row between its two stages: downloaded bytes, or the reason there are none."""

    key: str
    row: RawRow
    item: Item
    got: Any  # pipelines.fetch.Fetched
    error: SampleError | None


@dataclass
class RowOutcome:
    """One parquet row plus, on success, the sample's tar fields."""

    key: str
    record: dict[str, Any]
    fields: dict[str, bytes] | None = None


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _fail(record: dict, exc: SampleError, attempts: int) -> dict:
    # Object addresses ("<BytesIO at 0x7f..>") would make sidecars differ between identical runs.
    message = _ADDRESS_RE.sub("", exc.message or exc.reason)
    record.update(status="failed", error_reason=exc.reason, error_message=message,
                  attempts=int(getattr(exc, "attempts", attempts)))
    return record


def _text_fields(item: Item, meta: dict, key: str) -> dict[str, bytes]:
    fields = {"txt": item.caption.encode("utf-8"), "json": shards.canonical_json(meta)}
    if item.label is not None:
        fields["cls"] = str(item.label).encode()
    return fields


class RowProcessor:
    """Turns one manifest row into outcomes (several for a video row with a ``clips`` list)."""

    def __init__(self, config: PreprocessConfig, media_root: str | None = None):
        self.config = config
        self.media_root = media_root
        self.fetcher = Fetcher(FetchOptions(timeout_s=config.timeout_s, retries=config.retries,
                                            max_bytes=config.max_bytes, honor_robots=config.honor_robots,
                                            user_agent=config.user_agent, pool_size=max(config.threads, 4)))
        self.image_opts = ImageOptions(size=config.image_size, resize_mode=config.resize_mode,
                                       jpeg_quality=config.jpeg_quality, min_image_size=config.min_image_size,
                                       max_aspect_ratio=config.max_aspect_ratio, resample=config.resample)
        self._video_opts = None

    @property
    def video_opts(self):
        if self._video_opts is None:
            from pipelines.video import VideoOptions

            c = self.config
            self._video_opts = VideoOptions(num_frames=c.num_frames, sampler=c.sampler, fps=c.fps,
                                            max_frames=c.max_frames, size=c.frame_size,
                                            resize_mode=c.frame_resize_mode, jpeg_quality=c.jpeg_quality,
                                            backend=c.video_backend, timeout_s=c.video_timeout_s,
                                            min_duration=c.min_duration, keep_video=c.keep_video, seed=c.seed)
        return self._video_opts

    # ------------------------------------------------------------------------------------------
    def base_record(self, key: str, row: RawRow, item: Item | None, cmap: ColumnMap | None = None) -> dict[str, Any]:
        """The parquet row of a sample; for a row that failed validation (``item`` None), its media source
        and extra columns as far as ``cmap`` can read them, so the sidecar keeps what the manifest said."""
        rec: dict[str, Any] = {"key": key, "source": row.source, "source_index": row.source_index,
                               "status": "success", "error_reason": None, "error_message": None, "attempts": 0}
        if item is not None:
            rec.update(url=item.url, caption=item.caption, captions=item.captions, label=item.label, **item.extras)
        elif cmap is not None and "__invalid__" not in row.values:
            rec.update({k: v for k, v in row_extras(row.values, cmap).items()
                        if isinstance(k, str) and k not in RESERVED_FIELDS and not k.startswith("_")},
                       url=media_source(row.values, cmap))
        else:
            v = row.values
            rec["url"] = str(v.get("url") or v.get("path") or "") or None
        return rec

    def process(self, shard: int, r: int, row: RawRow, cmap: ColumnMap) -> list[RowOutcome]:
        key = shards.make_key(shard, r)
        try:
            item = normalize_row(row.values, cmap, self.config.modality, self.config.allow_empty_caption)
        except SampleError as exc:
            return [RowOutcome(key, _fail(self.base_record(key, row, None, cmap), exc, 0))]
        try:
            if self.config.modality == "image":
                return [self._image(key, row, item)]
            return self._video(key, row, item)
        except Exception as exc:  # a bug, not a bad sample: recorded with type and message, run goes on
            return [_internal(self, key, row, item, exc)]

    def retry_item(self, key: str, row: RawRow, item: Item, clip: tuple | None) -> RowOutcome:
        """Re-run one row (or one clip) of a committed shard under ``--retry-failed``."""
        if self.config.modality == "image":
            return self._image(key, row, item)
        return self._video_clip(key, row, item, clip, None)

    def _image(self, key: str, row: RawRow, item: Item) -> RowOutcome:
        return self.image_finish(self.image_fetch(key, row, item))

    # The two stages of an image row. ``run_shard`` runs the first (I/O) on the fetch threads and the
    # second (decode/resize/encode, CPU) on ``_cpu_threads`` threads, as img2dataset does: with 32
    # threads each doing both, GIL and scheduler contention cost ~10-15 % more CPU per image (measured
    # on the 10k-image benchmark: 22-24 s vs 20 s of CPU, most of the difference in system time).
    def image_fetch(self, key: str, row: RawRow, item: Item) -> "_ImageFetch":
        """Download the row's bytes (a failure is kept, not raised)."""
        try:
            got = self.fetcher.fetch(resolve_source(item.url, self.media_root, row.source))
        except SampleError as exc:
            return _ImageFetch(key, row, item, None, exc)
        return _ImageFetch(key, row, item, got, None)

    def image_finish(self, f: "_ImageFetch") -> RowOutcome:
        """Decode, resize and encode fetched bytes into a sample, or record why not."""
        rec = self.base_record(f.key, f.row, f.item)
        if f.error is not None:
            return RowOutcome(f.key, _fail(rec, f.error, 1))
        rec["attempts"] = f.got.attempts
        try:
            sample = process_image(f.got.data, self.image_opts)
        except SampleError as exc:
            return RowOutcome(f.key, _fail(rec, exc, rec["attempts"] or 1))
        item, row, key = f.item, f.row, f.key
        rec.update(sample.meta)
        meta = {"key": key, "url": item.url, "source": row.source, "source_index": row.source_index,
                **sample.meta, **item.extras}
        if len(item.captions) > 1:
            meta["captions"] = item.captions
        fields = _text_fields(item, meta, key)
        fields["jpg"] = sample.jpg
        return RowOutcome(key, rec, fields)

    def _video(self, key: str, row: RawRow, item: Item, fixed_key: str | None = None) -> list[RowOutcome]:
        url = resolve_source(item.url, self.media_root, row.source)
        local = self.fetcher.local_path(url)
        tmp_dir = None
        attempts, fetch_err, data_sha, nbytes = 1, None, None, None
        try:
            if local is None:
                try:
                    got = self.fetcher.fetch(url)
                    attempts = got.attempts
                    tmp_dir = tempfile.mkdtemp(prefix="mplug2-video-")
                    local = os.path.join(tmp_dir, "media")
                    with open(local, "wb") as f:
                        f.write(got.data)
                    data_sha, nbytes = _sha256(got.data), len(got.data)
                except SampleError as exc:
                    fetch_err = exc
            else:
                try:
                    with open(local, "rb") as f:  # also proves the file exists and is readable
                        head = f.read()
                    if len(head) > self.config.max_bytes:
                        from pipelines.errors import TOO_LARGE
                        raise SampleError(TOO_LARGE, f"{len(head)} bytes > max_bytes {self.config.max_bytes}")
                    bad = non_media_reason(head, None, item.url)
                    if bad is not None:
                        raise bad
                    data_sha, nbytes = _sha256(head), len(head)
                except FileNotFoundError:
                    from pipelines.errors import NOT_FOUND
                    fetch_err = SampleError(NOT_FOUND, f"no such file: {local}")
                except IsADirectoryError:
                    from pipelines.errors import INVALID_INPUT
                    fetch_err = SampleError(INVALID_INPUT, f"{local} is a directory")
                except SampleError as exc:
                    fetch_err = exc
            clips: list[tuple | None] = list(item.clips) if item.clips else [None]
            # With a clips column every key gets a clip suffix, even for one-clip rows (stable key shape).
            multi = fixed_key is None and (bool(self.config.clips_col) or (item.clips is not None and len(item.clips) > 1))
            outs = []
            for ci, clip in enumerate(clips):
                ckey = fixed_key or (shards.make_key(*map(int, key.split("_")), ci) if multi else key)
                citem = item
                if item.clip_captions is not None and ci < len(item.clip_captions):  # each clip its own sentence
                    citem = dataclasses.replace(item, captions=[item.clip_captions[ci]], clip_captions=None)
                if fetch_err is not None:
                    rec = self.base_record(ckey, row, citem)
                    if multi:
                        rec["clip_index"] = ci
                    outs.append(RowOutcome(ckey, _fail(rec, fetch_err, attempts)))
                    continue
                outs.append(self._video_clip(ckey, row, citem, clip, (local, data_sha, nbytes, attempts),
                                             clip_index=ci if multi else None))
            return outs
        finally:
            if tmp_dir:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def _video_clip(self, key: str, row: RawRow, item: Item, clip: tuple | None, fetched: tuple | None,
                    clip_index: int | None = None) -> RowOutcome:
        from pipelines.video import process_video

        if fetched is None:  # retry path: fetch this row again
            outs = self._video(key, row, Item(item.url, item.captions, item.label, [clip] if clip else None,
                                              item.extras), fixed_key=key)
            return outs[0]
        local, data_sha, nbytes, attempts = fetched
        rec = self.base_record(key, row, item)
        rec["attempts"] = attempts
        if clip_index is not None:
            rec["clip_index"] = clip_index
        start, end = (clip if clip else (None, None))
        rec["clip_start"], rec["clip_end"] = start, end
        try:
            vs = process_video(local, key=key, opts=self.video_opts, clip_start=start, clip_end=end)
        except SampleError as exc:
            return RowOutcome(key, _fail(rec, exc, attempts))
        m = vs.meta
        rec.update(width=m.get("width"), height=m.get("height"), duration=m.get("duration"), fps=m.get("fps"),
                   num_frames=m.get("num_frames", len(vs.frames)), bytes=nbytes, sha256=data_sha)
        meta = {"key": key, "url": item.url, "source": row.source, "source_index": row.source_index,
                "bytes": nbytes, "sha256": data_sha, **m, **item.extras}
        if clip_index is not None:
            meta["clip_index"] = clip_index
        if len(item.captions) > 1:
            meta["captions"] = item.captions
        fields = _text_fields(item, meta, key)
        for i, frame in enumerate(vs.frames):
            fields[f"f{i:03d}.jpg"] = frame
        if vs.mp4 is not None:
            fields["mp4"] = vs.mp4
        return RowOutcome(key, rec, fields)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


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


def _worker_threads(config: PreprocessConfig) -> int:
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
            outcomes, quarantine = _retry_outcomes(config, out, task, proc)
        elif config.modality == "image":
            outcomes = _image_outcomes(config, task, proc)
        else:
            with ThreadPoolExecutor(_worker_threads(config)) as pool:
                futures = [pool.submit(proc.process, task.shard, r, row, task.column_maps[row.source])
                           for r, row in enumerate(task.rows)]
                for fut in futures:
                    outcomes.extend(fut.result())
    finally:
        proc.fetcher.close()
    return _write_and_commit(config, out, task, outcomes, t0, quarantine)


def _cpu_threads(config: PreprocessConfig) -> int:
    """Decode/resize/encode threads of an image shard task: one per CPU the task is given, plus one, so
    one thread's GIL-holding Python work overlaps another's GIL-free Pillow work (measured: same CPU
    per image as one thread, lower wall time when the machine is shared)."""
    return max(1, math.ceil(config.task_cpus)) + 1


def _image_outcomes(config: PreprocessConfig, task: ShardTask, proc: RowProcessor) -> list[RowOutcome]:
    """Fetch on ``config.threads`` I/O threads, decode/resize/encode on :func:`_cpu_threads` threads.

    Downloads run ahead of the CPU stage by at most ``2 x threads`` rows (bounded memory: a fetched row
    waits in a queue until a CPU thread takes it). Outcomes are sorted by key before writing, so the
    order in which rows finish never shows in the shard.
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
            ready.put(RowOutcome(key, _fail(proc.base_record(key, row, None, task.column_maps[row.source]), exc, 0)))
            return
        except Exception as exc:  # a bug, not a bad sample
            ready.put(_internal(proc, key, row, None, exc))
            return
        try:
            ready.put(proc.image_fetch(key, row, item))
        except Exception as exc:
            ready.put(_internal(proc, key, row, item, exc))

    def consume(count: int) -> list[RowOutcome]:
        mine = []
        for _ in range(count):
            got = ready.get()
            window.release()
            if isinstance(got, RowOutcome):
                mine.append(got)
                continue
            try:
                mine.append(proc.image_finish(got))
            except Exception as exc:
                mine.append(_internal(proc, got.key, got.row, got.item, exc))
        return mine

    cpu = min(_cpu_threads(config), n)
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


def _internal(proc: RowProcessor, key: str, row: RawRow, item: Item | None, exc: Exception) -> RowOutcome:
    """A bug, not a bad sample: logged with its traceback and recorded as ``internal_error``."""
    log.error("internal error on %s", key, exc_info=exc)
    err = SampleError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    return RowOutcome(key, _fail(proc.base_record(key, row, item), err, 1))


def _retry_outcomes(config: PreprocessConfig, out: shards.Output, task: ShardTask,
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
        item = Item(url=rec["url"], captions=list(rec.get("captions") or []), label=rec.get("label"),
                    extras=extras)
        clip = (rec["clip_start"], rec["clip_end"]) if rec.get("clip_start") is not None else None
        row = RawRow(source=rec["source"], source_index=rec["source_index"], values={})
        try:
            o = proc.retry_item(rec["key"], row, item, clip)
        except Exception as exc:
            err = SampleError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            o = RowOutcome(rec["key"], _fail(dict(rec), err, 1))
        o.record["attempts"] = int(rec.get("attempts") or 0) + int(o.record.get("attempts") or 1)
        if rec.get("clip_index") is not None:
            o.record["clip_index"] = rec["clip_index"]
        return o

    with ThreadPoolExecutor(_worker_threads(config)) as pool:
        redone = list(pool.map(again, redo))
    log.info("shard %d: retried %d rows, %d now succeed", task.shard, len(redo),
             sum(o.fields is not None for o in redone))
    for old, new in zip(redo, redone):
        if old["error_reason"] == TIMEOUT and new.record.get("error_reason") == TIMEOUT:
            quarantine.add(new.key)
    return keep + redone, sorted(quarantine)


def _write_and_commit(config: PreprocessConfig, out: shards.Output, task: ShardTask,
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
        if task.lease_owner and not shards.lease_owner_ok(config.output, task.lease_owner):
            raise shards.LeaseError(f"shard {task.shard}: writer lease lost, not committing")
        if task.retry_failed:  # uncommit first (marker, then tar): a crash mid-rewrite leaves it to be redone
            out.delete(shards.shard_name(config.split, task.shard, "_stats.json"))
            out.delete(shards.shard_name(config.split, task.shard, ".tar"))
        shards.commit_shard(out, config.split, task.shard, tar_path, parquet, stats)
        return stats
    finally:
        shutil.rmtree(staging, ignore_errors=True)
