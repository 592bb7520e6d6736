"""Run control on real Ray: per-shard deadline with whole-shard retries, and the global watchdog.

A run must always end with a summary: stragglers are cancelled, retried up to ``max_shard_retry`` and
then reported, and the exit code says the dataset is incomplete.
"""

from __future__ import annotations

import json
import time

import pytest

from mplug2 import storage
from pipelines.config import PreprocessConfig
from pipelines.errors import EXIT_INCOMPLETE
from pipelines.run import preprocess
from tests.pipelines.conftest import make_jpeg


def _slow_corpus(tmp_path, http_server, n=6):
    for i in range(n):
        http_server.routes[f"/{i}.jpg"] = (200, {}, make_jpeg(64, 64, seed=i))
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"url": http_server.url(f"/{i}.jpg"), "caption": f"c{i}"}) + "\n"
                           for i in range(n)))
    return str(man)


def test_shard_deadline_retries_then_reports(tmp_path, http_server, s3_bucket, ray_local):
    man = _slow_corpus(tmp_path, http_server)
    http_server.delay_s = 1.5  # every shard needs >= 3 s with one thread; the deadline is 1.5 s
    out = f"{s3_bucket}/deadline"
    t0 = time.monotonic()
    summary = preprocess(PreprocessConfig(manifest=[man], output=out, samples_per_shard=2, threads=1,
                                          shard_timeout_s=1.5, max_shard_retry=1, progress=False))
    assert time.monotonic() - t0 < 60
    assert sorted(summary.shards_failed) == [0, 1, 2] and summary.exit_code == EXIT_INCOMPLETE
    assert all("deadline" in why for why in summary.shards_failed.values())
    assert http_server.hits[f"/0.jpg"] == 2  # first attempt + one retry, then given up
    assert "FAILED shard 0" in summary.table()
    assert not storage.exists(f"{out}/train-000000_stats.json")


def test_watchdog_ends_the_run_with_a_summary(tmp_path, http_server, s3_bucket, ray_local):
    man = _slow_corpus(tmp_path, http_server, n=8)
    http_server.delay_s = 0.4
    out = f"{s3_bucket}/watchdog"
    t0 = time.monotonic()
    summary = preprocess(PreprocessConfig(manifest=[man], output=out, samples_per_shard=1, threads=1,
                                          max_in_flight=2, watchdog_s=2.0, progress=False))
    assert time.monotonic() - t0 < 30
    assert summary.watchdog_fired and summary.exit_code == EXIT_INCOMPLETE and "WATCHDOG" in summary.table()
    done = summary.shards_written
    assert len(done) < 8
    if done:  # what did commit is still described, and marked incomplete if numbering has gaps
        ds = json.loads(storage.read_bytes(f"{out}/dataset.json"))
        assert [s["name"] for s in ds["shards"]] == [f"train-{i:06d}.tar" for i in done]
        assert ds["complete"] == (done == list(range(len(done))))


def test_interrupted_extend_resumes_its_own_plan(tmp_path, http_server, s3_bucket, ray_local):
    """An extend cut short (here by the watchdog) keeps its plan; the next extend finishes exactly those rows."""
    from pipelines import shards
    from pipelines.errors import ConfigError

    for i in range(10):
        http_server.routes[f"/{i}.jpg"] = (200, {}, make_jpeg(64, 64, seed=i))
    man = tmp_path / "m.jsonl"
    line = lambda i: json.dumps({"url": http_server.url(f"/{i}.jpg"), "caption": f"c{i}"}) + "\n"  # noqa: E731
    man.write_text("".join(line(i) for i in range(3)))
    out = f"{s3_bucket}/ext"
    cfg = dict(manifest=[str(man)], output=out, samples_per_shard=2, threads=1, max_in_flight=1, progress=False)
    assert preprocess(PreprocessConfig(**cfg)).shards_written == [0, 1]
    with man.open("a") as f:
        f.writelines(line(i) for i in range(3, 10))
    http_server.delay_s = 0.5
    cut = preprocess(PreprocessConfig(mode="extend", watchdog_s=2.5, **cfg))
    assert cut.watchdog_fired and len(cut.shards_written) < 4
    assert storage.exists(f"{out}/{shards.PENDING_EXTEND}")
    with pytest.raises(ConfigError, match="extend"):
        preprocess(PreprocessConfig(**cfg))  # the plain layout no longer applies
    http_server.delay_s = 0.0
    done = preprocess(PreprocessConfig(mode="extend", **cfg))
    assert done.exit_code == 0 and sorted(cut.shards_written + done.shards_written) == [2, 3, 4, 5]
    assert not storage.exists(f"{out}/{shards.PENDING_EXTEND}")
    ds = json.loads(storage.read_bytes(f"{out}/dataset.json"))
    assert ds["complete"] and ds["extended"] and [s["name"] for s in ds["shards"]] == [
        f"train-{i:06d}.tar" for i in range(6)]
    captions = []
    for s in ds["shards"]:
        captions += [v["txt"].decode() for v in shards.read_tar(storage.read_bytes(f"{out}/{s['name']}")).values()]
    assert sorted(captions) == sorted(f"c{i}" for i in range(10))  # every row exactly once
    assert preprocess(PreprocessConfig(mode="extend", **cfg)).shards_written == []


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_rows_that_time_out_twice_are_quarantined(tmp_path, http_server, ray_local, executor):
    import socket

    from pipelines import shards

    stall = socket.socket()  # accepts connections, never answers: every fetch times out
    stall.bind(("127.0.0.1", 0))
    stall.listen(16)
    try:
        http_server.routes["/ok.jpg"] = (200, {}, make_jpeg(64, 64))
        man = tmp_path / "m.jsonl"
        man.write_text(json.dumps({"url": http_server.url("/ok.jpg"), "caption": "ok"}) + "\n"
                       + json.dumps({"url": f"http://127.0.0.1:{stall.getsockname()[1]}/x.jpg", "caption": "hang"}) + "\n")
        out = tmp_path / "out"
        cfg = dict(manifest=[str(man)], output=str(out), timeout_s=0.5, retries=0, progress=False, executor=executor,
                   num_cpus=2)
        first = preprocess(PreprocessConfig(**cfg))
        assert first.failures == {"timeout": 1}
        second = preprocess(PreprocessConfig(retry_failed=True, **cfg))
        assert second.shards_written == [0] and second.failures == {"timeout": 1}
        stats = json.loads((out / "train-000000_stats.json").read_text())
        assert stats["quarantine"] == ["000000_000001"] and stats["retryable_failures"] == 0
        third = preprocess(PreprocessConfig(retry_failed=True, **cfg))  # nothing left worth retrying
        assert third.shards_written == [] and third.shards_skipped == [0]
        assert len(shards.read_tar((out / "train-000000.tar").read_bytes())) == 1
    finally:
        stall.close()
