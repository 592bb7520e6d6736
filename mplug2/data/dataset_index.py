"""The shard list of one corpus, read from its manifest (``dataset.json``, else ``sizes.json``).

Why not list the prefix: sidecars live beside the tars and filer-backed S3 stores list ``prefix/`` marker
objects (``data-contract.md`` §4). The loader's sample order is a pure function of the shard sizes, so the
counts recorded here must be exact; the stream checks them again while reading.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from mplug2 import storage
from mplug2.data.shard_contract import DATASET_JSON, FORMAT_VERSION, SHARD_TAR_RE as _SHARD_RE, SIZES_JSON

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "ShardInfo", "DatasetIndex", "DatasetIndexError", "load_index"]


class DatasetIndexError(ValueError):
    """The prefix has no usable manifest, or the manifest breaks the data contract."""


@dataclass(frozen=True)
class ShardInfo:
    name: str          # "train-000012.tar"
    url: str           # full local path or s3:// URL
    nsamples: int
    bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetIndex:
    prefix: str
    split: str
    shards: tuple[ShardInfo, ...]
    source: str        # "dataset.json" or "sizes.json"

    @property
    def num_samples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    def __len__(self) -> int:
        return len(self.shards)


def _parse_entries(entries: list[tuple[str, int, int | None, str | None]], prefix: str, split: str,
                   source: str) -> DatasetIndex:
    shards: list[ShardInfo] = []
    for name, nsamples, nbytes, sha in entries:
        m = _SHARD_RE.match(name)
        if not m:
            raise DatasetIndexError(f"{prefix}/{source}: shard name {name!r} is not '<split>-NNNNNN.tar'")
        if m["split"] != split:
            continue
        if not isinstance(nsamples, int) or nsamples < 0:
            raise DatasetIndexError(f"{prefix}/{source}: shard {name} has invalid nsamples {nsamples!r}")
        shards.append(ShardInfo(name, storage.join(prefix, name), nsamples, nbytes, sha))
    shards.sort(key=lambda s: s.name)
    if not shards:
        raise DatasetIndexError(f"{prefix}/{source}: no shards for split {split!r}")
    numbers = [int(_SHARD_RE.match(s.name)["num"]) for s in shards]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))[:5]
        raise DatasetIndexError(f"{prefix}/{source}: shard numbering has gaps (missing e.g. {missing}); "
                                "the contract requires contiguous shards from 0")
    return DatasetIndex(prefix=prefix, split=split, shards=tuple(shards), source=source)


def load_index(prefix: str, split: str = "train") -> DatasetIndex:
    """Read the shard list and per-shard sample counts of ``prefix`` (local folder or ``s3://``).

    ``dataset.json`` (format version 1, ``shards: [{name, nsamples, bytes, sha256}]``) is preferred;
    ``sizes.json`` (``{"train-000000.tar": 9998, ...}``, open_clip's format) is the fallback.
    """
    prefix = str(prefix).rstrip("/")
    ds_url, sizes_url = storage.join(prefix, DATASET_JSON), storage.join(prefix, SIZES_JSON)
    if storage.exists(ds_url):
        try:
            meta = json.loads(storage.read_bytes(ds_url))
        except json.JSONDecodeError as exc:
            raise DatasetIndexError(f"{ds_url}: not valid JSON ({exc})") from exc
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DatasetIndexError(f"{ds_url}: format_version {version!r}, this loader reads {FORMAT_VERSION}")
        raw = meta.get("shards")
        if not isinstance(raw, list):
            raise DatasetIndexError(f"{ds_url}: missing 'shards' list")
        try:
            entries = [(s["name"], s["nsamples"], s.get("bytes"), s.get("sha256")) for s in raw]
        except (KeyError, TypeError) as exc:
            raise DatasetIndexError(f"{ds_url}: shard entries need 'name' and 'nsamples' ({exc!r})") from exc
        index = _parse_entries(entries, prefix, split, "dataset.json")
    elif storage.exists(sizes_url):
        sizes = json.loads(storage.read_bytes(sizes_url))
        if not isinstance(sizes, dict):
            raise DatasetIndexError(f"{sizes_url}: expected an object of shard name -> sample count")
        index = _parse_entries([(k, v, None, None) for k, v in sizes.items()], prefix, split, "sizes.json")
    else:
        raise DatasetIndexError(f"{prefix}: neither dataset.json nor sizes.json found (is the dataset complete?)")
    log.info("corpus %s (%s): %d shards, %d samples from %s", prefix, split, len(index), index.num_samples,
             index.source)
    return index
