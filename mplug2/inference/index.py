"""Embedding files: what ``mplug2-model embed`` and the batch-inference job write, and what ``retrieve`` searches.

Schema (Parquet; one row per item or text; one file, or a folder / prefix of ``*.parquet`` files, e.g. one per
shard, read as one index):

| column | type | meaning |
|---|---|---|
| ``id`` | string | the item's id: its source path/URL for media, ``text:<n>`` or the text itself for texts |
| ``modality`` | string | ``"video"``, ``"image"`` or ``"text"`` |
| ``embedding`` | list<float32> | the L2-normalised ITC embedding (all rows of an index have one length) |
| ``source`` | string, optional | where the media can be read again (``retrieve --rerank`` re-reads it for ITM) |

Other columns are kept by writers that need them and ignored here. Embeddings of one index must come from one
model (the ITC projections define the space); ``read_index`` checks that the dimension agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mplug2 import storage

__all__ = ["MODALITIES", "SCHEMA", "EmbeddingIndex", "read_index", "write_index"]

MODALITIES = ("video", "image", "text")
SCHEMA = pa.schema([("id", pa.string()), ("modality", pa.string()), ("embedding", pa.list_(pa.float32())),
                    ("source", pa.string())])


def write_index(path: str, ids: Sequence[str], modalities: Sequence[str], embeddings: torch.Tensor,
                sources: Sequence[str | None] | None = None) -> None:
    """Write one Parquet file in the schema above (local path or ``s3://``)."""
    n = len(ids)
    if len(modalities) != n or embeddings.shape[0] != n:
        raise ValueError(f"{n} ids, {len(modalities)} modalities, {embeddings.shape[0]} embeddings")
    bad = sorted(set(modalities) - set(MODALITIES))
    if bad:
        raise ValueError(f"modality must be one of {MODALITIES}, got {bad}")
    emb = embeddings.detach().float().cpu().numpy()
    table = pa.table({"id": pa.array(list(ids), pa.string()), "modality": pa.array(list(modalities), pa.string()),
                      "embedding": pa.array(list(emb), pa.list_(pa.float32())),
                      "source": pa.array(list(sources) if sources is not None else [None] * n, pa.string())},
                     schema=SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.atomic_write(path, buf.getvalue().to_pybytes())


@dataclass
class EmbeddingIndex:
    ids: list[str]
    modalities: list[str]
    sources: list[str | None]
    embeddings: torch.Tensor           # (N, D) float32

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: torch.Tensor, k: int, modalities: Sequence[str] = ("video", "image")
               ) -> list[list[tuple[int, float]]]:
        """Top-k rows (index, cosine similarity) per query ``(Q, D)``, among rows of the given modalities."""
        if queries.shape[-1] != self.embeddings.shape[1]:
            raise ValueError(f"query dimension {queries.shape[-1]} != index dimension {self.embeddings.shape[1]}: "
                             "the index was written by another model")
        rows = torch.tensor([i for i, m in enumerate(self.modalities) if m in modalities], dtype=torch.long)
        if rows.numel() == 0:
            return [[] for _ in range(queries.shape[0])]
        sim = queries.float() @ self.embeddings[rows].t()
        top = sim.topk(min(k, rows.numel()), dim=1)
        return [[(int(rows[j]), float(s)) for s, j in zip(ts, tj)] for ts, tj in zip(top.values, top.indices)]


def _files(url: str) -> list[str]:
    if url.endswith(".parquet"):
        return [url]
    names = [n for n in storage.list_names(url) if n.endswith(".parquet")]
    if not names:
        raise FileNotFoundError(f"{url}: no .parquet files (expected an embedding file or a folder of them)")
    return [storage.join(url, n) for n in sorted(names)]


def read_index(url: str | Sequence[str]) -> EmbeddingIndex:
    """Read one embedding file, a folder/prefix of them, or a list of either (local or ``s3://``)."""
    urls = [url] if isinstance(url, str) else list(url)
    ids: list[str] = []
    mods: list[str] = []
    sources: list[str | None] = []
    chunks: list[np.ndarray] = []
    for u in urls:
        for f in _files(u):
            if not storage.exists(f):
                raise FileNotFoundError(f"{f}: no such embedding file")
            table = pq.read_table(pa.BufferReader(storage.read_bytes(f)))
            missing = {"id", "modality", "embedding"} - set(table.column_names)
            if missing:
                raise ValueError(f"{f}: not an embedding file (missing columns {sorted(missing)}; see "
                                 "mplug2.inference.index for the schema)")
            ids += [str(x) for x in table.column("id").to_pylist()]
            mods += table.column("modality").to_pylist()
            sources += (table.column("source").to_pylist() if "source" in table.column_names
                        else [None] * table.num_rows)
            col = table.column("embedding").combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if table.num_rows and flat.size % table.num_rows:
                raise ValueError(f"{f}: embeddings of different lengths")
            chunks.append(flat.reshape(table.num_rows, -1) if table.num_rows else flat.reshape(0, 0))
    dims = {c.shape[1] for c in chunks if c.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"embeddings of different dimensions {sorted(dims)}: files from different models")
    emb = np.concatenate([c for c in chunks if c.shape[0]]) if dims else np.zeros((0, 0), np.float32)
    return EmbeddingIndex(ids, mods, sources, torch.from_numpy(np.ascontiguousarray(emb)))
