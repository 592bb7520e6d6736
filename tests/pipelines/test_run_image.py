"""End-to-end image corpus on real SeaweedFS + real Ray: readers, failure accounting, resume modes.

One corpus mixes good media (local files and HTTP) with every kind of bad input; the tests then run
the pipeline the way users do (``pipelines.run.preprocess``) and read the result with the standard
readers (webdataset, Ray Data, wids, tar).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mplug2 import storage
from pipelines import shards
from pipelines.config import PreprocessConfig
from pipelines.errors import ConfigError
from pipelines.run import preprocess
from pipelines.verify import verify_dataset
from tests.pipelines.conftest import make_jpeg, wids_dataset, write_images

S = 6  # samples per shard


@pytest.fixture
def corpus(tmp_path, http_server, s3_bucket):
    """Manifest rows with the failure reason each must end with (None = a sample)."""
    good = write_images(tmp_path / "img", 14)
    srv = http_server
    (tmp_path / "trunc.jpg").write_bytes(good[0].read_bytes()[:2000])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    srv.routes["/h1.jpg"] = (200, {"Content-Type": "image/jpeg"}, make_jpeg(640, 480, seed=77))
    srv.routes["/h2.jpg"] = (200, {}, make_jpeg(500, 500, seed=78))
    srv.routes["/noai.jpg"] = (200, {"X-Robots-Tag": "noai"}, make_jpeg(300, 300))
    srv.routes["/big.jpg"] = (200, {}, b"\xff\xd8" + b"\0" * 400_000)
    srv.routes["/500.jpg"] = (500, {}, b"oops")
    flaky = {"up": False}
    srv.routes["/flaky.jpg"] = lambda n: (200, {}, make_jpeg(400, 300, seed=79)) if flaky["up"] else (503, {}, b"")
    storage.atomic_write(f"{s3_bucket}/media/s3.jpg", make_jpeg(700, 500, seed=80))
    rows: list[tuple[str, str, str | None]] = [(str(p), f"local image {i}", None) for i, p in enumerate(good)]
    rows[3:3] = [(srv.url("/h1.jpg"), "http image", None), (str(tmp_path / "trunc.jpg"), "cut", "decode_error"),
                 (str(tmp_path / "zero.jpg"), "zero", "decode_error"), (srv.url("/404.jpg"), "404", "not_found")]
    rows[10:10] = [(srv.url("/500.jpg"), "5xx", "download_error"), (str(tmp_path / "text.jpg"), "txt", "decode_error"),
                   (srv.url("/big.jpg"), "too big", "too_large"), (good[1].name, "   ", "empty_caption"),
                   (srv.url("/noai.jpg"), "opted out", "opted_out"), (srv.url("/flaky.jpg"), "flaky", "download_error"),
                   (f"{s3_bucket}/media/s3.jpg", "from s3", None), ("", "no url", "invalid_input"),
                   (srv.url("/h2.jpg"), "http 2", None)]
    table = pa.Table.from_pylist([{"url": u, "caption": c, "punsafe": i / 100} for i, (u, c, _) in enumerate(rows)])
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=5)
    manifest = f"{s3_bucket}/manifest/part-000.parquet"
    storage.atomic_write(manifest, buf.getvalue().to_pybytes())
    return {"rows": rows, "manifest": manifest, "flaky": flaky, "server": srv, "dir": tmp_path,
            "media_root": str(tmp_path / "img")}


def _config(corpus, output, **kw) -> PreprocessConfig:
    return PreprocessConfig(manifest=[corpus["manifest"]], output=output, samples_per_shard=S, threads=4, retries=1,
                            max_bytes=300_000, media_root=corpus["media_root"], progress=False, **kw)


def _expected_failures(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, r in rows:
        if r:
            out[r] = out.get(r, 0) + 1
    return out


def _download(prefix: str, dest) -> list:
    fs, path = storage.get_fs(prefix)
    dest.mkdir(parents=True, exist_ok=True)
    for name in shards.Output(prefix).list_names():
        fs.get_file(f"{path}/{name}", str(dest / name))
    return sorted(dest.iterdir())


def test_image_corpus_reads_back_everywhere(corpus, s3_bucket, ray_local, tmp_path):
    out = f"{s3_bucket}/ds"
    summary = preprocess(_config(corpus, out))
    rows = corpus["rows"]
    n_good = sum(r is None for _, _, r in rows)
    assert summary.failures == _expected_failures(rows)
    assert (summary.rows, summary.successes, summary.exit_code) == (len(rows), n_good, 0)
    assert verify_dataset(out) == []
    ds = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    n_shards = -(-len(rows) // S)
    assert [s["name"] for s in ds["shards"]] == [f"train-{i:06d}.tar" for i in range(n_shards)]
    assert ds["format_version"] == 1 and ds["manifests"][0]["rows"] == len(rows)
    assert ds["manifests"][0]["shards"] == [0, n_shards - 1] and ds["failures"] == _expected_failures(rows)
    assert {"Pillow", "PyAV", "webdataset", "mplug2-ray", "ffmpeg"} <= set(ds["versions"])

    local = tmp_path / "copy"
    _download(out, local)
    tars = [str(local / s["name"]) for s in ds["shards"]]

    # webdataset
    import webdataset as wds

    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == n_good
    for s in samples:
        assert s["jpg"].size == (256, 256) and s["txt"]
        meta = s["json"]
        shard, row = map(int, s["__key__"].split("_"))
        url, caption, reason = rows[shard * S + row]  # the key maps back to exactly one manifest row
        assert reason is None and meta["url"] == url and s["txt"] == caption and meta["key"] == s["__key__"]
        assert meta["punsafe"] == pytest.approx((shard * S + row) / 100) and meta["source_index"] == shard * S + row

    # Ray Data straight from S3
    import ray

    fs, base = storage.pyarrow_fs(out)
    rds = ray.data.read_webdataset([f"{base}/{s['name']}" for s in ds["shards"]], filesystem=fs)
    recs = rds.take_all()
    assert len(recs) == n_good and {"jpg", "txt", "json", "__key__"} <= set(recs[0])

    # wids over our index
    wd = wids_dataset(str(local / "wids-index.json"), cache_dir=str(tmp_path / "wids-cache"))  # not /tmp
    assert len(wd) == n_good
    assert wd[0][".txt"] and wd[n_good - 1]["__key__"] == max(s["__key__"] for s in samples)

    # tar -tf, and the per-shard parquet accounts for every input row
    listing = subprocess.run(["tar", "-tf", tars[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing == sorted(listing) and all(n.count(".") == 1 for n in listing)
    pq_rows = [r for s in ds["shards"] for r in pq.read_table(local / s["name"].replace(".tar", ".parquet")).to_pylist()]
    assert len(pq_rows) == len(rows)
    for r in pq_rows:
        expected = rows[r["source_index"]][2]
        assert r["status"] == ("success" if expected is None else "failed")
        assert r["error_reason"] == expected and (expected is None or r["error_message"])
        assert "punsafe" in r
    sizes = json.loads((local / "sizes.json").read_text())
    assert sum(sizes.values()) == n_good


def test_rerun_is_byte_identical_and_incremental(corpus, s3_bucket, ray_local):
    a, b = f"{s3_bucket}/a", f"{s3_bucket}/b"
    preprocess(_config(corpus, a))
    preprocess(_config(corpus, b))
    da = json.loads(storage.read_bytes(f"{a}/dataset.json"))
    db = json.loads(storage.read_bytes(f"{b}/dataset.json"))
    assert da["shards"] == db["shards"]  # names, counts and sha256 of every tar
    for s in da["shards"]:
        assert hashlib.sha256(storage.read_bytes(f"{b}/{s['name']}")).hexdigest() == s["sha256"]
        assert storage.read_bytes(f"{a}/{s['name']}") == storage.read_bytes(f"{b}/{s['name']}")
        assert storage.read_bytes(f"{a}/{s['name'][:-4]}.parquet") == storage.read_bytes(f"{b}/{s['name'][:-4]}.parquet")

    # incremental: nothing to do; deleting one commit marker redoes exactly that shard
    again = preprocess(_config(corpus, a))
    assert again.shards_written == [] and len(again.shards_skipped) == len(da["shards"])
    storage.remove(f"{a}/train-000001_stats.json")
    redo = preprocess(_config(corpus, a))
    assert redo.shards_written == [1]
    assert json.loads(storage.read_bytes(f"{a}/dataset.json"))["shards"] == da["shards"]

    # another config on the same output is refused (naming overwrite) before anything is written
    with pytest.raises(ConfigError, match="overwrite"):
        preprocess(_config(corpus, a, image_size=128))
    assert json.loads(storage.read_bytes(f"{a}/dataset.json"))["shards"] == da["shards"]
    # overwrite deletes only contract objects
    storage.atomic_write(f"{a}/README.txt", b"mine")
    over = preprocess(_config(corpus, a, image_size=128, mode="overwrite"))
    assert len(over.shards_written) == len(da["shards"]) and storage.read_bytes(f"{a}/README.txt") == b"mine"


def test_local_executor_writes_the_same_bytes_as_ray(corpus, s3_bucket, ray_local):
    """The process pool (what ``--executor auto`` picks without a Ray cluster) and the Ray Data stages run
    the same shard code: same tars (sha256), same parquet sidecars, same dataset index."""
    a, b = f"{s3_bucket}/ex-ray", f"{s3_bucket}/ex-local"
    ra = preprocess(_config(corpus, a, executor="ray"))
    rb = preprocess(_config(corpus, b, executor="local", num_cpus=2))
    assert ra.shards_written == rb.shards_written and not ra.shards_failed and not rb.shards_failed
    assert ra.failures == rb.failures == _expected_failures(corpus["rows"])
    # without model stages the stages run in one operator (one task per shard); the summary still shows each
    n = len(ra.shards_written)
    fused = ra.stages["Map(fetch_decode->commit)"]
    assert fused["shards"] == fused["stages"]["fetch_decode"]["shards"] == fused["stages"]["commit"]["shards"] == n
    da = json.loads(storage.read_bytes(f"{a}/dataset.json"))
    db = json.loads(storage.read_bytes(f"{b}/dataset.json"))
    assert da["shards"] == db["shards"]
    for s in da["shards"]:
        assert hashlib.sha256(storage.read_bytes(f"{b}/{s['name']}")).hexdigest() == s["sha256"]
        assert storage.read_bytes(f"{a}/{s['name']}") == storage.read_bytes(f"{b}/{s['name']}")
        assert storage.read_bytes(f"{a}/{s['name'][:-4]}.parquet") == storage.read_bytes(f"{b}/{s['name'][:-4]}.parquet")
    assert verify_dataset(b) == []


def test_retry_failed_refetches_only_retryable_rows(corpus, s3_bucket, ray_local):
    out = f"{s3_bucket}/r"
    first = preprocess(_config(corpus, out))
    assert first.failures["download_error"] == 2  # the 500 and the (still down) flaky server
    before = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    srv = corpus["server"]
    hits_before = dict(srv.hits)
    corpus["flaky"]["up"] = True
    summary = preprocess(_config(corpus, out, retry_failed=True))
    flaky_row = next(i for i, (u, _, _) in enumerate(corpus["rows"]) if u.endswith("/flaky.jpg"))
    flaky_shard = flaky_row // S
    five_row = next(i for i, (u, _, _) in enumerate(corpus["rows"]) if u.endswith("/500.jpg"))
    assert sorted(summary.shards_written) == sorted({flaky_shard, five_row // S})
    # only the retryable rows were fetched again
    changed = {k for k, v in srv.hits.items() if v != hits_before.get(k)}
    assert changed == {"/flaky.jpg", "/500.jpg"}
    after = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    assert after["failures"]["download_error"] == 1 and after["num_samples"] == before["num_samples"] + 1
    tar = shards.read_tar(storage.read_bytes(f"{out}/train-{flaky_shard:06d}.tar"))
    key = shards.make_key(flaky_shard, flaky_row % S)
    assert json.loads(tar[key]["json"])["url"].endswith("/flaky.jpg")
    old = {s["name"]: s for s in before["shards"]}
    for s in after["shards"]:  # untouched shards keep their bytes
        if int(s["name"][6:12]) not in (flaky_shard, five_row // S):
            assert s == old[s["name"]]
    pq_rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/train-{flaky_shard:06d}.parquet"))).to_pylist()
    flaky_rec = next(r for r in pq_rows if r["key"] == key)
    assert flaky_rec["status"] == "success" and flaky_rec["attempts"] >= 3
    assert verify_dataset(out) == []


def test_extend_processes_only_appended_rows(corpus, s3_bucket, ray_local, tmp_path):
    out = f"{s3_bucket}/e"
    good = [(u, c, r) for u, c, r in corpus["rows"] if r is None and "://" not in u]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c, _ in good[:8]))
    cfg = dict(samples_per_shard=S, threads=4, media_root=corpus["media_root"], progress=False)
    first = preprocess(PreprocessConfig(manifest=[str(man)], output=out, **cfg))
    assert first.shards_written == [0, 1] and first.successes == 8
    with man.open("a") as f:
        f.writelines(json.dumps({"url": u, "caption": c + " (new)"}) + "\n" for u, c, _ in good[8:11])
    ext = preprocess(PreprocessConfig(manifest=[str(man)], output=out, mode="extend", **cfg))
    assert ext.shards_written == [2] and ext.rows == 3
    tar = shards.read_tar(storage.read_bytes(f"{out}/train-000002.tar"))
    assert sorted(tar) == ["000002_000000", "000002_000001", "000002_000002"]
    assert all(v["txt"].endswith(b"(new)") for v in tar.values())
    ds = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    assert [(m["skip_rows"], m["rows"], m["shards"]) for m in ds["manifests"]] == [(0, 8, [0, 1]), (8, 3, [2, 2])]
    names_before = shards.Output(out).list_names()
    dataset_before = storage.read_bytes(f"{out}/dataset.json")
    none = preprocess(PreprocessConfig(manifest=[str(man)], output=out, mode="extend", **cfg))
    assert none.shards_written == [] and none.rows == 0
    assert shards.Output(out).list_names() == names_before
    assert storage.read_bytes(f"{out}/dataset.json") == dataset_before
    assert verify_dataset(out) == []
