"""The shard contract (data-contract §3-§10) in one place: names, format version, marker and index files.

The pipeline (``pipelines.shards``) writes by these rules and the loader (``mplug2.data.dataset_index``)
reads by them. Data flows pipelines -> mplug2, so the contract lives here, pure (no I/O, no imports beyond
the standard library), where both sides can import it without a backward dependency.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1

TAR = ".tar"
PARQUET = ".parquet"
STATS = "_stats.json"           # the commit marker: a shard is committed iff its stats file exists
PENDING_TAR = ".tar.pending"    # a tar uploaded but not yet published (invisible to ``*.tar`` listings)

DATASET_JSON = "dataset.json"   # shard list, counts, hashes, config, manifests (written last)
SIZES_JSON = "sizes.json"       # open_clip's {"train-000000.tar": n}
WIDS_INDEX = "wids-index.json"  # webdataset's wids shard index
DATASET_FILES = (SIZES_JSON, WIDS_INDEX, DATASET_JSON)
LOCK_NAME = "_writer.lock"
PENDING_EXTEND = "_extend.pending.json"  # the plan of an unfinished extend run

# A region box (visual grounding) in a sample's json: COCO ``[x, y, w, h]`` in pixels of the written image
# (the pipeline maps the manifest's box through its resize; ``mplug2.data.boxes`` holds the geometry).
BOX_FIELD = "box"

SHARD_TAR_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<num>\d{6})\.tar$")

__all__ = [
    "FORMAT_VERSION", "TAR", "PARQUET", "STATS", "PENDING_TAR", "DATASET_JSON", "SIZES_JSON", "WIDS_INDEX",
    "DATASET_FILES", "LOCK_NAME", "PENDING_EXTEND", "BOX_FIELD", "SHARD_TAR_RE", "shard_name", "shard_re",
]


def shard_name(split: str, shard: int, kind: str = TAR) -> str:
    """``train-000012.tar`` / ``.parquet`` / ``_stats.json`` / ``.tar.pending``."""
    return f"{split}-{shard:06d}{kind}"


def shard_re(split: str) -> re.Pattern:
    """Matches the contract objects of one split; group 1 is the shard number, group 2 the kind."""
    return re.compile(rf"^{re.escape(split)}-(\d{{6}})(\.tar\.pending|\.tar|\.parquet|_stats\.json)$")
