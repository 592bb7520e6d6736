"""Check a written dataset against the data contract (what ``mplug2-data verify`` prints).

Reads only what loaders read (``dataset.json`` and the shards it names), so it also proves that no
uncommitted shard is referenced.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from pipelines import shards


def verify_shard_bytes(data: bytes, mtime: int | None = None) -> list[str]:
    """Problems with one tar's bytes under §5/§7 (USTAR, metadata, order, names, adjacency)."""
    problems: list[str] = []
    mtime = shards.source_date_epoch() if mtime is None else mtime
    if len(data) % 512:
        problems.append("tar size is not a multiple of 512")
    seen_keys: list[str] = []
    fields_of: dict[str, list[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            hdr = data[m.offset:m.offset + 512]
            if hdr[257:263] != b"ustar\x00" or hdr[263:265] != b"00":
                problems.append(f"{m.name}: not a POSIX USTAR header")
            if m.pax_headers or m.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                problems.append(f"{m.name}: PAX header")
            if not m.isreg():
                problems.append(f"{m.name}: not a regular file")
                continue
            if (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) != (mtime, 0o644, 0, 0, "", ""):
                problems.append(f"{m.name}: metadata {(m.mtime, oct(m.mode), m.uid, m.gid, m.uname, m.gname)}")
            key, dot, field = m.name.partition(".")
            try:
                shards.validate_member(key, field)
            except (ValueError, UnicodeEncodeError) as exc:
                problems.append(str(exc))
            if not dot:
                problems.append(f"{m.name}: no field extension")
            if seen_keys and seen_keys[-1] != key:
                if key in fields_of:
                    problems.append(f"{key}: members not adjacent")
                if key < seen_keys[-1]:
                    problems.append(f"{key}: samples not sorted by key")
            if not seen_keys or seen_keys[-1] != key:
                seen_keys.append(key)
            fl = fields_of.setdefault(key, [])
            if field in fl:
                problems.append(f"{key}: duplicate field {field}")
            if fl and field < fl[-1]:
                problems.append(f"{key}: fields not sorted")
            fl.append(field)
            if field == "json":
                problems += _json_problems(m.name, tar.extractfile(m).read())
    return problems


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_problems(member: str, data: bytes) -> list[str]:
    """A sample's json must be strict JSON (no NaN / Infinity, which Python writes and most readers refuse)."""
    try:
        json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{member}: invalid JSON ({exc})"]
    return []


def verify_dataset(output: str, split: str = "train") -> list[str]:
    """All contract problems found under ``output`` (empty list = the dataset is sound)."""
    out = shards.Output(output)
    problems: list[str] = []
    ds = out.read_json("dataset.json")
    if ds is None:
        return ["dataset.json missing (run not finished?)"]
    if ds.get("format_version") != shards.FORMAT_VERSION:
        problems.append(f"format_version {ds.get('format_version')}")
    sizes = out.read_json("sizes.json") or {}
    wids = out.read_json("wids-index.json") or {}
    wids_by_url = {s["url"]: s for s in wids.get("shardlist", [])}
    names = [s["name"] for s in ds.get("shards", [])]
    expected = [shards.shard_name(split, i) for i in range(len(names))]
    if names != expected:
        problems.append("shard names are not contiguous from 0")
    for entry in ds.get("shards", []):
        name = entry["name"]
        try:
            data = out.read_bytes(name)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        stats_name = name[:-4] + "_stats.json"
        if not out.exists(stats_name):
            problems.append(f"{name}: listed but not committed")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
        try:
            problems += [f"{name}: {p}" for p in verify_shard_bytes(data)]
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                n = len({m.name.partition(".")[0] for m in tar})
        except (tarfile.TarError, EOFError, OSError) as exc:  # truncated or not a tar at all
            problems.append(f"{name}: damaged, not a readable tar ({type(exc).__name__}: {exc})")
            continue
        if n != entry["nsamples"] or sizes.get(name) != n:
            problems.append(f"{name}: {n} samples, dataset.json {entry['nsamples']}, sizes.json {sizes.get(name)}")
        w = wids_by_url.get(name)
        if not w or w["nsamples"] != n or w["filesize"] != len(data) or w["md5sum"] != hashlib.md5(data).hexdigest():
            problems.append(f"{name}: wids-index entry wrong")
    return problems


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(verify_dataset(*sys.argv[1:]), indent=1))
