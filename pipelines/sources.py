"""Input manifests (data-contract §2): discovery, streaming readers, column mapping, row validation.

Manifests are read *streaming* (parquet row groups, chunked text), never loaded whole: the driver turns
them into groups of ``samples_per_shard`` rows as it goes. A schema problem (missing column, extra column
colliding with a contract field) is a :class:`ConfigError` raised before anything is written; a bad value
in one row is a :class:`SampleError` (``invalid_input`` / ``empty_caption``) counted for that row only.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from mplug2 import storage
from mplug2.data.boxes import BoxError, parse_box
from mplug2.data.shard_contract import BOX_FIELD
from pipelines.config import PreprocessConfig
from pipelines.corpora import LAYOUTS
from pipelines.shards import json_safe
from pipelines.errors import EMPTY_CAPTION, INVALID_INPUT, ConfigError, SampleError

log = logging.getLogger(__name__)

SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}

# Names the writer itself puts into a sample's json or the shard parquet: an extra column with one of
# these names would be silently overwritten, so it is rejected at start-up.
RESERVED_FIELDS = frozenset({
    "key", "url", "source", "source_index", "caption", "captions", "cls", "label", "status", "error_reason",
    "error_message", "attempts", "width", "height", "original_width", "original_height", "bytes", "sha256",
    "duration", "fps", "num_frames", "frame_times", "sampler", "clip_start", "clip_end", "clip_end_clipped",
    "clip_index", "rotation", "padded", "backend", BOX_FIELD, "source_box",
})
SOURCE_BOX = "source_box"   # the manifest's box as read (source pixels), in the parquet sidecar

# Accepted stand-ins for a media column (WebVid ships `contentUrl` or a local `path`; MSR-VTT `video_id`).
URL_ALIASES = {"url": ("path",), "path": ("url",), "contentUrl": ("path", "url"),
               "video": ("video_id", "path", "url"), "image": ("path", "url", "filepath")}

_TIME_RE = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")
# ISO 8601 durations as WebVid writes them: PT00H00M18S, PT1M2.5S, P0DT0H0M9S.
_ISO_RE = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")
# Index columns pandas / Hugging Face write into parquet exports: row numbers, not data.
_INDEX_RE = re.compile(r"^__index_level_\d+__$|^__null_dask_index__$")


_EXPRESSION_ALIASES = frozenset({"sentence", "sent", "ref", "refexp", "phrase"})


def is_index_column(name: str) -> bool:
    return bool(_INDEX_RE.match(name))


# ---------------------------------------------------------------------------------------------- files
def expand_manifests(specs: list[str]) -> list[str]:
    """Resolve files, folders and globs (local or ``s3://``) to a sorted, de-duplicated file list.

    Sorted path order makes row numbering, hence keys, deterministic (data-contract §2).
    """
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        fs, path = storage.get_fs(spec)
        remote = storage.is_remote(spec)
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path)) if remote else sorted(glob.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _format_of(p) is not None)
        elif fs.exists(path):
            found = [path]
        else:
            raise ConfigError(f"manifest not found: {spec}")
        found = [p for p in found if not fs.isdir(p)]
        if not found:
            raise ConfigError(f"no manifest files match {spec}")
        out.extend(f"s3://{p}" if remote else p for p in found)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _format_of(path: str) -> tuple[str, bool] | None:
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            if gz and fmt == "parquet":
                return None
            return fmt, gz
    return None


def detect_format(path: str, input_format: str = "auto") -> tuple[str, bool]:
    """``(format, gzipped)`` of a manifest file from its suffix (or the forced ``input_format``)."""
    found = _format_of(path)
    if input_format != "auto":
        return input_format, path.lower().endswith(".gz")
    if found is None:
        raise ConfigError(f"cannot tell the manifest format of {path} (use .parquet/.csv/.tsv/.jsonl/.json[.gz])")
    return found


def file_info(path: str) -> dict[str, Any]:
    """Path, size and sha256 of one manifest file (recorded in ``dataset.json``), read in 1 MiB chunks."""
    fs, p = storage.get_fs(path)
    h = hashlib.sha256()
    size = 0
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"path": path, "size": size, "sha256": h.hexdigest()}


def _open_binary(path: str, gz: bool):
    fs, p = storage.get_fs(path)
    f = fs.open(p, "rb")
    return gzip.GzipFile(fileobj=f) if gz else f


# ---------------------------------------------------------------------------------------------- readers
def iter_records(path: str, input_format: str = "auto", column_names: list[str] | None = None,
                 batch_rows: int = 4096) -> Iterator[dict[str, Any]]:
    """Yield the rows of one manifest file as dicts, streaming.

    A jsonl line that is not a JSON object yields ``{"__invalid__": message}`` so it is counted as
    ``invalid_input`` at its row number instead of shifting every later key.
    """
    fmt, gz = detect_format(path, input_format)
    if fmt in LAYOUTS:
        fmt = "json"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open_binary(path, False) as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in pf.schema_arrow.names if not is_index_column(c)]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()
    elif fmt in ("csv", "tsv"):
        with _open_binary(path, gz) as raw:
            # utf-8-sig: a byte-order mark (Excel, Windows exports) is not part of the first column's name.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="", errors="replace")
            # TSV (CC3M/CC12M) captions contain bare quotes: no quoting there, as img2dataset/pandas do.
            kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
            reader = csv.reader(text, **kw)
            header = column_names or next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            first = column_names is not None
            for cells in reader:
                if not cells or not any(c.strip() for c in cells):  # blank and trailing lines
                    continue
                if first and [c.strip().lower() for c in cells] == [h.lower() for h in header]:
                    first = False  # --column-names given, but the file has that header after all
                    continue
                first = False
                if len(cells) != len(header):
                    yield {"__invalid__": f"{len(cells)} fields, expected {len(header)}"}
                    continue
                yield dict(zip(header, cells))
    elif fmt == "jsonl":
        with _open_binary(path, gz) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {"__invalid__": f"bad JSON line: {exc}"}
                    continue
                yield obj if isinstance(obj, dict) else {"__invalid__": "JSON line is not an object"}
    elif fmt == "json":
        # A JSON array must be parsed whole; such files (MSR-VTT, COCO annotations) are small.
        with _open_binary(path, gz) as raw:
            data = json.loads(raw.read().decode("utf-8-sig"))
        if input_format in LAYOUTS:
            yield from LAYOUTS[input_format](data, path)
            return
        if isinstance(data, dict):
            for k in ("annotations", "data", "items", "videos", "images"):
                if isinstance(data.get(k), list):
                    data = data[k]
                    break
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json manifest must be a list of objects")
        for obj in data:
            yield obj if isinstance(obj, dict) else {"__invalid__": "list item is not an object"}
    else:  # pragma: no cover - validated in config
        raise ConfigError(f"unsupported manifest format {fmt!r}")


def read_columns(path: str, input_format: str = "auto", column_names: list[str] | None = None) -> list[str]:
    """Column names of a manifest (parquet schema, text header, or the first record's keys)."""
    fmt, _ = detect_format(path, input_format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open_binary(path, False) as f:
            return [c for c in pq.ParquetFile(f).schema_arrow.names if not is_index_column(c)]
    for rec in iter_records(path, input_format, column_names):
        if "__invalid__" not in rec:
            return list(rec)
    if fmt in ("csv", "tsv"):
        with _open_binary(path, detect_format(path, input_format)[1]) as raw:
            first = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace").readline()
        return column_names or first.rstrip("\r\n").split("\t" if fmt == "tsv" else ",")
    return []


# ---------------------------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class ColumnMap:
    """Where each contract field comes from in the manifest, after aliases and presets."""

    url: str
    captions: tuple[str, ...]
    label: str | None = None
    start: str | None = None
    end: str | None = None
    clips: str | None = None
    box: str | None = None  # grounding: the region's COCO box
    drop: frozenset[str] = field(default_factory=frozenset)
    media_template: str | None = None  # "video{}.mp4": the media column holds ids, not paths
    clip_captions: bool = False  # captions[i] belongs to clips[i]
    # Extra columns' arrow types (parquet manifests), so the sidecar keeps float32 as float32.
    extra_types: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def used(self) -> set[str]:
        return {c for c in (self.url, *self.captions, self.label, self.start, self.end, self.clips, self.box) if c}


def resolve_columns(columns: list[str], config: PreprocessConfig, path: str = "manifest") -> ColumnMap:
    """Map config flags onto a manifest's columns; raise :class:`ConfigError` on missing/colliding ones."""
    cols = set(columns)
    url = config.url_col
    if url not in cols:
        alias = next((a for a in URL_ALIASES.get(url, ()) if a in cols), None)
        if alias:
            url = alias
        else:
            hint = "set --url-col or --preset (docs/corpora.md)"
            if any("://" in c or c.lower().endswith((".jpg", ".png", ".mp4")) for c in cols):
                hint = ("its first line looks like data, not a header: pass --column-names (e.g. caption,url "
                        "for CC3M, url,caption for CC12M) or --preset cc3m / cc12m")
            raise ConfigError(f"{path}: media column {config.url_col!r} not found (columns: {sorted(cols)[:8]}); "
                              + hint)
    caps = config.caption_col if isinstance(config.caption_col, (list, tuple)) else [config.caption_col]
    captions = []
    for c in caps:
        if c in cols:
            captions.append(c)
        elif c == "caption" and ({"captions", "sentences"} & cols):  # COCO/MSR-VTT reference lists
            captions.append(sorted({"captions", "sentences"} & cols)[0])
        elif c == "TEXT" and ({"text", "caption"} & cols):  # LAION re-exports with lower-case names
            captions.append(sorted({"text", "caption"} & cols)[-1])
        elif c == "expression" and (_EXPRESSION_ALIASES & cols):  # RefCOCO exports name it several ways
            captions.append(sorted(_EXPRESSION_ALIASES & cols)[0])
        else:
            raise ConfigError(f"{path}: caption column {c!r} not found (columns: {sorted(cols)}); "
                              "set --caption-col")
    box = config.box_col
    if box and box not in cols and box in ("bbox", "box") and ({"bbox", "box"} & cols):
        box = sorted({"bbox", "box"} & cols)[0]
    for name, col in (("label", config.label_col), ("start", config.start_col), ("end", config.end_col),
                      ("clips", config.clips_col), ("box", box)):
        if col and col not in cols:
            raise ConfigError(f"{path}: {name} column {col!r} not found (columns: {sorted(cols)})")
    cmap = ColumnMap(url=url, captions=tuple(captions), label=config.label_col, start=config.start_col,
                     end=config.end_col, clips=config.clips_col, box=box, drop=frozenset(config.drop_cols),
                     media_template=config.media_template, clip_captions=config.clip_captions,
                     extra_types=_parquet_types(path, config.input_format))
    extra = cols - cmap.used - cmap.drop
    collide = sorted(c for c in extra if c in RESERVED_FIELDS or (c.startswith("_") and not is_index_column(c)))
    if collide:
        raise ConfigError(f"{path}: extra columns {collide} collide with contract fields; drop them with "
                          f"--drop-cols {' '.join(collide)}, rename them in the manifest, or map them with "
                          "--url-col / --caption-col / --label-col / --start-col / --end-col")
    return cmap


def _parquet_types(path: str, input_format: str) -> dict:
    try:
        if detect_format(path, input_format)[0] != "parquet":
            return {}
    except ConfigError:
        return {}
    import pyarrow.parquet as pq

    with _open_binary(path, False) as f:
        schema = pq.ParquetFile(f).schema_arrow
    return {f.name: f.type for f in schema}


def row_extras(raw: dict[str, Any], cmap: ColumnMap) -> dict[str, Any]:
    """The row's columns the contract does not map, to keep in the json and the parquet sidecar: NaN as
    None, pandas / Hugging Face index columns dropped."""
    return {k: json_safe(v) for k, v in raw.items()
            if k not in cmap.used and k not in cmap.drop and not (isinstance(k, str) and is_index_column(k))}


def media_source(raw: dict[str, Any], cmap: ColumnMap) -> str | None:
    """The row's media source as text (through ``--media-template`` for id columns), None if absent."""
    v = raw.get(cmap.url)
    if cmap.media_template and isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
        return cmap.media_template.format(str(v).strip())
    return v.strip() if isinstance(v, str) and v.strip() else None


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Item:
    """One validated manifest row: what the fetch/decode stage needs."""

    url: str
    captions: list[str]
    label: int | None = None
    clips: list[tuple[float, float | None]] | None = None  # None: the whole file (images, plain videos)
    extras: dict[str, Any] = field(default_factory=dict)
    clip_captions: list[str] | None = None  # clip i's own caption (ActivityNet, HowTo100M)
    box: tuple[float, float, float, float] | None = None  # grounding: COCO [x, y, w, h] in source pixels

    @property
    def caption(self) -> str:
        return self.captions[0] if self.captions else ""


def parse_time(value: Any) -> float | None:
    """Seconds from a float/int or ``HH:MM:SS(.fff)`` / ``MM:SS``; None for an empty value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        m = _TIME_RE.match(s)
        if m:
            h, mi, sec = m.groups()
            return int(h or 0) * 3600 + int(mi) * 60 + float(sec)
        m = _ISO_RE.match(s)
        if m and s not in ("P", "PT"):
            d, h, mi, sec = m.groups()
            return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(sec or 0)
        try:
            return float(s)
        except ValueError:
            pass
    raise SampleError(INVALID_INPUT, f"bad time value {value!r}")


def _captions(raw: dict[str, Any], cmap: ColumnMap, allow_empty: bool) -> list[str]:
    out: list[str] = []
    for col in cmap.captions:
        v = raw.get(col)
        if isinstance(v, str) and v.strip().startswith("[") and col in ("captions", "sentences"):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        values = v if isinstance(v, (list, tuple)) else [v]
        for c in values:
            if c is None or (isinstance(c, float) and math.isnan(c)):  # pandas' missing text
                continue
            if isinstance(c, dict) and isinstance(c.get("caption"), str):  # MSR-VTT {"caption": ...} items
                c = c["caption"]
            if not isinstance(c, str):
                raise SampleError(INVALID_INPUT, f"caption in {col!r} is {type(c).__name__}, not text")
            c = c.strip()
            if c:
                out.append(c)
    if not out and not allow_empty:
        raise SampleError(EMPTY_CAPTION, "empty caption")
    return out


def normalize_row(raw: dict[str, Any], cmap: ColumnMap, modality: str, allow_empty_caption: bool = False) -> Item:
    """Validate one raw manifest row into an :class:`Item` or raise ``SampleError``."""
    if "__invalid__" in raw:
        raise SampleError(INVALID_INPUT, str(raw["__invalid__"]))
    url = media_source(raw, cmap)
    if url is None:
        v = raw.get(cmap.url)
        hint = " (ids? set --media-template, e.g. 'video{}.mp4')" if isinstance(v, int) else ""
        raise SampleError(INVALID_INPUT, f"empty or non-text media source in {cmap.url!r}: {v!r}{hint}")
    captions = _captions(raw, cmap, allow_empty_caption)
    label = None
    if cmap.label:
        v = raw.get(cmap.label)
        try:
            label = int(v) if not isinstance(v, bool) and str(v).strip() not in ("", "None") else None
        except (TypeError, ValueError):
            raise SampleError(INVALID_INPUT, f"label {v!r} is not an integer") from None
        if label is None:
            raise SampleError(INVALID_INPUT, "missing label")
    clips = None
    if modality == "video":
        if cmap.clips:
            v = raw.get(cmap.clips)
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    raise SampleError(INVALID_INPUT, f"clips value is not a JSON list: {v[:80]!r}") from None
            if not isinstance(v, (list, tuple)) or not v:
                raise SampleError(INVALID_INPUT, "clips must be a non-empty list of [start, end] pairs")
            clips = []
            for pair in v:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise SampleError(INVALID_INPUT, f"clip {pair!r} is not a [start, end] pair")
                clips.append(_check_span(parse_time(pair[0]), parse_time(pair[1])))
            if len(clips) > 1000:
                raise SampleError(INVALID_INPUT, f"{len(clips)} clips in one row (max 1000)")
            if cmap.clip_captions and len(captions) != len(clips):
                raise SampleError(INVALID_INPUT, f"{len(clips)} clips but {len(captions)} captions (one per clip)")
        elif cmap.start or cmap.end:
            start = parse_time(raw.get(cmap.start)) if cmap.start else None
            end = parse_time(raw.get(cmap.end)) if cmap.end else None
            clips = [_check_span(start, end)]
    clip_captions = captions if cmap.clip_captions and clips is not None else None
    box = None
    if cmap.box:
        try:
            box = parse_box(raw.get(cmap.box))
        except BoxError as exc:
            raise SampleError(INVALID_INPUT, str(exc)) from None
    extras = row_extras(raw, cmap)
    bad = sorted(k for k in extras if k in RESERVED_FIELDS or not isinstance(k, str) or k.startswith("_"))
    if bad:
        raise SampleError(INVALID_INPUT, f"fields {bad} collide with contract fields (drop them with "
                                         f"--drop-cols {' '.join(map(str, bad))})")
    return Item(url=url, captions=captions, label=label, clips=clips, extras=extras, clip_captions=clip_captions,
                box=box)


def _check_span(start: float | None, end: float | None) -> tuple[float, float | None]:
    start = 0.0 if start is None else start
    if start < 0:
        raise SampleError(INVALID_INPUT, f"start {start} < 0")
    if end is not None and end <= start:
        raise SampleError(INVALID_INPUT, f"start {start} >= end {end}")
    return (start, end)


# ---------------------------------------------------------------------------------------------- stream
@dataclass
class RawRow:
    """A manifest row as shipped to a shard task: where it came from plus its untouched values."""

    source: str
    source_index: int
    values: dict[str, Any]


def check_manifests(paths: list[str], config: PreprocessConfig) -> dict[str, ColumnMap]:
    """Resolve the column map of every manifest (start-up schema check: nothing is written yet)."""
    maps = {}
    for p in paths:
        cols = read_columns(p, config.input_format, config.column_names)
        maps[p] = resolve_columns(cols, config, p)
    return maps


def iter_rows(paths: list[str], config: PreprocessConfig, skip: dict[str, int] | None = None
              ) -> Iterator[RawRow]:
    """Stream every manifest row in sorted file order; ``skip[path]`` rows of a file are passed over
    (rows already consumed by earlier runs, for ``extend``)."""
    skip = skip or {}
    for p in paths:
        n_skip = skip.get(p, 0)
        for i, rec in enumerate(iter_records(p, config.input_format, config.column_names)):
            if i < n_skip:
                continue
            yield RawRow(source=p, source_index=i, values=rec)
