"""One manifest row into outcomes: a sample (its tar fields and parquet record) or a failure with its reason.

Rows are processed in two stages each, fetch (I/O) and finish (decode, sample, resize, encode: CPU), so an
executor can run the stages on different threads (the local pool's shard task) or as different Ray Data
stages. A bad *sample* never raises: it ends as a record with a failure reason (data-contract §11).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from pipelines import shards
from pipelines.config import PreprocessConfig
from mplug2.data.shard_contract import BOX_FIELD
from pipelines.errors import FILTERED, INTERNAL_ERROR, INVALID_INPUT, NOT_FOUND, TOO_LARGE, SampleError
from pipelines.fetch import Fetcher, FetchOptions, non_media_reason, resolve_source
from pipelines.image import ImageOptions, process_image
from pipelines.resize import resize_box
from pipelines.sources import RESERVED_FIELDS, SOURCE_BOX, ColumnMap, Item, RawRow, media_source, normalize_row, row_extras

log = logging.getLogger(__name__)


@dataclass
class ImageFetch:
    """An image row between its two stages: downloaded bytes, or the reason there are none."""

    key: str
    row: RawRow
    item: Item
    got: Any  # pipelines.fetch.Fetched
    error: SampleError | None


@dataclass
class VideoFetch:
    """A video row between its two stages: downloaded bytes or a local path, their hash and size, or the
    reason there are none."""

    key: str
    row: RawRow
    item: Item
    local: str | None = None
    data: bytes | None = None
    sha256: str | None = None
    nbytes: int | None = None
    attempts: int = 1
    error: SampleError | None = None


@dataclass
class RowOutcome:
    """One parquet row plus, on success, the sample's tar fields."""

    key: str
    record: dict[str, Any]
    fields: dict[str, bytes] | None = None


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def fail_record(record: dict, exc: SampleError, attempts: int) -> dict:
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
            if item.box is not None:   # kept on failures too, so --retry-failed knows the row's box
                rec[SOURCE_BOX] = list(item.box)
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
            return [RowOutcome(key, fail_record(self.base_record(key, row, None, cmap), exc, 0))]
        try:
            if self.config.modality == "image":
                return [self._image(key, row, item)]
            return self._video(key, row, item)
        except Exception as exc:  # a bug, not a bad sample: recorded with type and message, run goes on
            return [internal_outcome(self, key, row, item, exc)]

    def retry_item(self, key: str, row: RawRow, item: Item, clip: tuple | None) -> RowOutcome:
        """Re-run one row (or one clip) of a committed shard under ``--retry-failed``."""
        if self.config.modality == "image":
            return self._image(key, row, item)
        return self._video_clip(key, row, item, clip, None)

    def _image(self, key: str, row: RawRow, item: Item) -> RowOutcome:
        return self.image_finish(self.image_fetch(key, row, item))

    # The two stages of an image row. ``run_shard`` runs the first (I/O) on the fetch threads and the
    # second (decode/resize/encode, CPU) on ``cpu_threads`` threads, as img2dataset does: with 32
    # threads each doing both, GIL and scheduler contention cost ~10-15 % more CPU per image (measured
    # on the 10k-image benchmark: 22-24 s vs 20 s of CPU, most of the difference in system time).
    def image_fetch(self, key: str, row: RawRow, item: Item) -> "ImageFetch":
        """Download the row's bytes (a failure is kept, not raised)."""
        try:
            got = self.fetcher.fetch(resolve_source(item.url, self.media_root, row.source))
        except SampleError as exc:
            return ImageFetch(key, row, item, None, exc)
        return ImageFetch(key, row, item, got, None)

    def image_finish(self, f: "ImageFetch") -> RowOutcome:
        """Decode, resize and encode fetched bytes into a sample, or record why not."""
        rec = self.base_record(f.key, f.row, f.item)
        if f.error is not None:
            return RowOutcome(f.key, fail_record(rec, f.error, 1))
        rec["attempts"] = f.got.attempts
        try:
            sample = process_image(f.got.data, self.image_opts)
        except SampleError as exc:
            return RowOutcome(f.key, fail_record(rec, exc, rec["attempts"] or 1))
        item, row, key = f.item, f.row, f.key
        rec.update(sample.meta)
        meta = {"key": key, "url": item.url, "source": row.source, "source_index": row.source_index,
                **sample.meta, **item.extras}
        if item.box is not None:
            try:
                meta[BOX_FIELD] = rec[BOX_FIELD] = self._written_box(item.box, sample.meta)
            except SampleError as exc:
                return RowOutcome(f.key, fail_record(rec, exc, rec["attempts"] or 1))
        if len(item.captions) > 1:
            meta["captions"] = item.captions
        fields = _text_fields(item, meta, key)
        fields["jpg"] = sample.jpg
        return RowOutcome(key, rec, fields)

    def _written_box(self, box: tuple, meta: dict) -> list[float]:
        """The manifest's box (source pixels) in pixels of the written image; a box reaching past the source
        image (beyond a pixel of rounding) is invalid_input, one the resize's crop cut off is filtered."""
        w, h = meta["original_width"], meta["original_height"]
        if box[0] + box[2] > w + 1 or box[1] + box[3] > h + 1:
            raise SampleError(INVALID_INPUT, f"box {list(box)} reaches outside the {w}x{h} image")
        out = resize_box(box, w, h, self.image_opts.size, self.image_opts.resize_mode)
        if out is None:
            raise SampleError(FILTERED, f"box {list(box)} is cut off by the {self.image_opts.resize_mode} resize")
        return [round(v, 2) for v in out]

    def _video(self, key: str, row: RawRow, item: Item, fixed_key: str | None = None) -> list[RowOutcome]:
        return self.video_finish(self.video_fetch(key, row, item), fixed_key)

    # The two stages of a video row: fetching (a download, or reading a local file for its hash and size)
    # and decoding every clip. The local pool runs both in one call; the Ray Data path runs them as stages.
    def video_fetch(self, key: str, row: RawRow, item: Item) -> "VideoFetch":
        """Download the row's media (kept in memory), or check a local file (kept as its path)."""
        url = resolve_source(item.url, self.media_root, row.source)
        local = self.fetcher.local_path(url)
        f = VideoFetch(key, row, item, local=local)
        if local is None:
            try:
                got = self.fetcher.fetch(url)
                f.attempts, f.data = got.attempts, got.data
                f.sha256, f.nbytes = _sha256(got.data), len(got.data)
            except SampleError as exc:
                f.error = exc
            return f
        try:
            with open(local, "rb") as fh:  # also proves the file exists and is readable
                head = fh.read()
            if len(head) > self.config.max_bytes:
                raise SampleError(TOO_LARGE, f"{len(head)} bytes > max_bytes {self.config.max_bytes}")
            bad = non_media_reason(head, None, item.url)  # a saved web page: said with the URL, not a path
            if bad is not None:
                raise bad
            f.sha256, f.nbytes = _sha256(head), len(head)
        except FileNotFoundError:
            f.error = SampleError(NOT_FOUND, f"no such file: {local}")
        except IsADirectoryError:
            f.error = SampleError(INVALID_INPUT, f"{local} is a directory")
        except SampleError as exc:
            f.error = exc
        return f

    def video_finish(self, f: "VideoFetch", fixed_key: str | None = None) -> list[RowOutcome]:
        """Decode every clip of a fetched video row into samples, or record why not."""
        key, row, item = f.key, f.row, f.item
        tmp_dir = None
        try:
            local = f.local
            if f.error is None and local is None:
                tmp_dir = tempfile.mkdtemp(prefix="mplug2-video-")
                local = os.path.join(tmp_dir, "media")
                with open(local, "wb") as fh:
                    fh.write(f.data)
            clips: list[tuple | None] = list(item.clips) if item.clips else [None]
            # With a clips column every key gets a clip suffix, even for one-clip rows (stable key shape).
            multi = fixed_key is None and (bool(self.config.clips_col) or (item.clips is not None and len(item.clips) > 1))
            outs = []
            for ci, clip in enumerate(clips):
                ckey = fixed_key or (shards.make_key(*map(int, key.split("_")), ci) if multi else key)
                citem = item
                if item.clip_captions is not None and ci < len(item.clip_captions):  # each clip its own sentence
                    citem = dataclasses.replace(item, captions=[item.clip_captions[ci]], clip_captions=None)
                if f.error is not None:
                    rec = self.base_record(ckey, row, citem)
                    if multi:
                        rec["clip_index"] = ci
                    outs.append(RowOutcome(ckey, fail_record(rec, f.error, f.attempts)))
                    continue
                outs.append(self._video_clip(ckey, row, citem, clip, (local, f.sha256, f.nbytes, f.attempts),
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
            return RowOutcome(key, fail_record(rec, exc, attempts))
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
    return hashlib.sha256(data).hexdigest()


def internal_outcome(proc: RowProcessor, key: str, row: RawRow, item: Item | None, exc: Exception) -> RowOutcome:
    """A bug, not a bad sample: logged with its traceback and recorded as ``internal_error``."""
    log.error("internal error on %s", key, exc_info=exc)
    err = SampleError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    return RowOutcome(key, fail_record(proc.base_record(key, row, item), err, 1))
