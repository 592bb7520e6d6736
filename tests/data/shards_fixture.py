"""Small contract-compliant shard sets (``data-contract.md`` §3-§9) for loader tests and the benchmark.

USTAR tars ``{split}-NNNNNN.tar``, keys ``{shard:06d}_{row:06d}``, fields sorted by name (``fNNN.jpg`` frames or
``jpg``, ``json``, ``txt``), fixed member metadata, plus ``sizes.json`` and ``dataset.json``
(``format_version: 1``, ``shards: [{name, nsamples, bytes, sha256}]``). Written locally or to ``s3://``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from mplug2 import storage


@dataclass
class ShardSet:
    prefix: str
    keys: list[list[str]]            # per shard, in tar order

    @property
    def all_keys(self) -> list[str]:
        return [k for shard in self.keys for k in shard]


def _jpeg(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray, texture: str = "noise",
          quality: int = 90) -> bytes:
    """``noise``: flat colour + uniform +-30 noise per pixel (worst-case JPEG entropy, tiny files for tests);
    ``natural``: a smooth random colour field + mild noise, closer to a photo's JPEG size and decode cost."""
    w, h = size
    if texture == "natural":
        field = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int64)
        arr = np.clip((smooth + base) // 2 + rng.integers(-4, 5, size=(h, w, 3)), 0, 255).astype(np.uint8)
    elif texture == "noise":
        arr = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"texture must be 'noise' or 'natural', got {texture!r}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(prefix: str, samples_per_shard: Sequence[int], *, frames: int = 0, size: tuple[int, int] = (40, 32),
                 split: str = "train", captions_per_sample: int = 1, write_dataset_json: bool = True,
                 seed: int = 0, texture: str = "noise", quality: int = 90) -> ShardSet:
    """Write ``len(samples_per_shard)`` shards; ``frames=0`` makes image samples (``jpg``), else video
    samples with ``frames`` fields ``f000.jpg..``. Returns the keys per shard."""
    rng = np.random.default_rng(seed)
    entries, sizes, all_keys = [], {}, []
    for shard, n in enumerate(samples_per_shard):
        buf = io.BytesIO()
        keys = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in range(n):
                key = f"{shard:06d}_{row:06d}"
                base = rng.integers(0, 256, size=3)
                caps = [f"A Photo, of sample {key}-variant/{c}!" for c in range(captions_per_sample)]
                meta = {"key": key, "source": "synthetic"}
                if captions_per_sample > 1:
                    meta["captions"] = caps
                fields = {"json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
                          "txt": caps[0].encode()}
                if frames:
                    for f in range(frames):
                        fields[f"f{f:03d}.jpg"] = _jpeg(rng, size, base + 8 * f, texture, quality)
                    meta["num_frames"] = frames
                else:
                    fields["jpg"] = _jpeg(rng, size, base, texture, quality)
                for name in sorted(fields):
                    _add(tar, f"{key}.{name}", fields[name])
                keys.append(key)
        data = buf.getvalue()
        name = f"{split}-{shard:06d}.tar"
        storage.atomic_write(storage.join(prefix, name), data)
        entries.append({"name": name, "nsamples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        sizes[name] = n
        all_keys.append(keys)
    storage.atomic_write(storage.join(prefix, "sizes.json"), json.dumps(sizes).encode())
    if write_dataset_json:
        storage.atomic_write(storage.join(prefix, "dataset.json"),
                             json.dumps({"format_version": 1, "shards": entries}, indent=1).encode())
    return ShardSet(prefix=prefix, keys=all_keys)
