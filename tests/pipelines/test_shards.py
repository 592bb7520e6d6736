"""Tar writer and sidecars against data-contract §5/§7/§9, plus the writer lease."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pyarrow.parquet as pq
import pytest

from pipelines import shards
from pipelines.lease import LeaseError, WriterLease, lease_owner_ok
from pipelines.verify import verify_shard_bytes

SAMPLES = {
    "000000_000002": {"txt": b"two", "jpg": b"\xff\xd8two", "json": b"{}"},
    "000000_000000": {"txt": b"zero", "jpg": b"\xff\xd8zero", "json": b"{}", "cls": b"3"},
}


def test_tar_is_ustar_sorted_with_fixed_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    info = shards.write_tar(str(tmp_path / "a.tar"), SAMPLES)
    data = (tmp_path / "a.tar").read_bytes()
    assert verify_shard_bytes(data) == []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "000000_000000.cls", "000000_000000.jpg", "000000_000000.json", "000000_000000.txt",
        "000000_000002.jpg", "000000_000002.json", "000000_000002.txt"]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(1700000000, 0o644, 0, 0, "", "")}
    assert data[257:263] == b"ustar\x00"  # POSIX USTAR magic, no PAX/GNU headers
    assert (info.nsamples, info.bytes) == (2, len(data))
    listing = subprocess.run(["tar", "-tf", str(tmp_path / "a.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [m.name for m in members]
    # same samples in another insertion order -> identical bytes
    shards.write_tar(str(tmp_path / "b.tar"), dict(reversed(list(SAMPLES.items()))))
    assert (tmp_path / "b.tar").read_bytes() == data
    assert shards.read_tar(data)["000000_000000"]["cls"] == b"3"


def test_empty_tar_is_valid(tmp_path):
    info = shards.write_tar(str(tmp_path / "e.tar"), {})
    with tarfile.open(tmp_path / "e.tar") as tar:
        assert tar.getmembers() == []
    assert info.nsamples == 0 and info.bytes % 512 == 0


@pytest.mark.parametrize("key,field", [("000000.000001", "jpg"), ("a/b", "jpg"), ("000001", "JPG"),
                                       ("000001", "__key__"), ("0" * 96, "jpg")])
def test_member_rules_are_enforced(tmp_path, key, field):
    with pytest.raises(ValueError):
        shards.write_tar(str(tmp_path / "x.tar"), {key: {field: b"x"}})


def test_verifier_flags_what_other_writers_do(tmp_path):
    """webdataset's TarWriter (float time.time() mtime -> PAX headers) breaks §7; the verifier must say so."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "w.tar")) as w:
        w.write({"__key__": "000000_000001", "txt": "b"})
        w.write({"__key__": "000000_000000", "txt": "a"})
    problems = verify_shard_bytes((tmp_path / "w.tar").read_bytes())
    assert any("metadata" in p or "PAX" in p for p in problems)
    assert any("not sorted" in p for p in problems)


def test_parquet_sidecar_schema_and_failures():
    rows = [
        {"key": "000000_000000", "source": "m.csv", "source_index": 0, "url": "u0", "caption": "c", "status": "success",
         "error_reason": None, "error_message": None, "attempts": 1, "width": 256, "height": 256, "punsafe": 0.1,
         "captions": ["c"], "tags": ["a"]},
        {"key": "000000_000001", "source": "m.csv", "source_index": 1, "url": "u1", "caption": "d", "status": "failed",
         "error_reason": "not_found", "error_message": "HTTP 404", "attempts": 1, "punsafe": None,
         "tags": {"odd": 1}},
    ]
    t = pq.read_table(io.BytesIO(shards.parquet_bytes(rows)))
    assert t.column_names[:4] == ["key", "source", "source_index", "url"]
    d = t.to_pylist()
    assert d[1]["error_message"] == "HTTP 404" and d[1]["status"] == "failed" and d[0]["punsafe"] == 0.1
    assert d[1]["tags"] == '{"odd":1}'  # inconsistent extra column kept as JSON text
    assert shards.parquet_bytes(rows) == shards.parquet_bytes(rows)


def test_writer_lease(tmp_path):
    out = shards.Output(str(tmp_path))
    a = WriterLease(out, ttl_s=60, settle_s=0)
    a.acquire()
    b = WriterLease(out, ttl_s=60, settle_s=0)
    with pytest.raises(LeaseError, match="being written by"):
        b.acquire()
    assert lease_owner_ok(out.url, a.owner) and not lease_owner_ok(out.url, b.owner)
    b.acquire(force=True)  # takeover: a's tasks must now refuse to commit
    assert not lease_owner_ok(out.url, a.owner)
    with pytest.raises(LeaseError, match="lost"):
        a.check()
    b.release()
    assert not out.exists(shards.LOCK_NAME)
    # a lease whose owner process on this host is dead is stale
    rec = {"owner": "x", "host": __import__("socket").gethostname(), "pid": 2 ** 22 + 12345, "heartbeat": 9e18}
    assert WriterLease.is_stale(rec, 60)
    # ...and a shard task that outlived its SIGKILLed driver must not commit under that driver's lease
    out.write_bytes(shards.LOCK_NAME, shards.canonical_json(rec))
    assert not lease_owner_ok(out.url, "x")


def test_tar_bytes_equal_pythons_own_ustar_writer(tmp_path):
    """The fast writer must produce exactly what tarfile (USTAR, same metadata) produces."""
    shards.write_tar(str(tmp_path / "fast.tar"), SAMPLES, mtime=0)
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in sorted(SAMPLES):
            for field in sorted(SAMPLES[key]):
                ti = tarfile.TarInfo(f"{key}.{field}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(SAMPLES[key][field]), 0, 0o644, "", ""
                tar.addfile(ti, io.BytesIO(SAMPLES[key][field]))
    assert (tmp_path / "fast.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()


def test_member_headers_equal_tarfiles_for_any_size_and_mtime():
    """ustar_header is tarfile's USTAR header for our metadata, including the overflow cases it hands back."""
    import random

    rng = random.Random(0)
    for _ in range(3000):
        name = f"{rng.randrange(10 ** 6):06d}_{rng.randrange(10 ** 6):06d}" + rng.choice(
            [".jpg", ".json", ".txt", "_001.f000.jpg", "." + "x" * rng.randrange(1, 80)])
        name = name[:99]
        size = rng.choice([0, 1, 511, 512, rng.randrange(10 ** 9), 8 ** 11 - 1, 8 ** 11])
        mtime = rng.choice([0, 1_700_000_000, 8 ** 11 - 1])
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, mtime, 0o644, 0, 0, "", ""
        try:
            ref = ti.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
        except ValueError:
            with pytest.raises(ValueError):
                shards.ustar_header(name, size, mtime)
            continue
        assert shards.ustar_header(name, size, mtime) == ref
