"""Executor choice (``--executor auto``) and the local pool's early start before the writer lease settles."""

from __future__ import annotations

import socket
import sys
import threading
import time
import types

import pytest

from pipelines import shards
from pipelines.lease import LeaseError, WriterLease
from pipelines.config import PreprocessConfig
from pipelines.run import choose_executor, ray_cluster_available
from pipelines.shard_task import ShardTask, run_shard
from pipelines.sources import RawRow, check_manifests
from tests.pipelines.conftest import make_jpeg


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """No Ray anywhere: no address variables, an empty Ray temp dir, and Ray not initialised here."""
    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    return tmp_path


def test_auto_is_local_without_a_cluster_and_explicit_choices_stay(no_cluster):
    assert not ray_cluster_available()
    assert choose_executor(PreprocessConfig()) == "local"  # auto is the default
    assert choose_executor(PreprocessConfig(executor="ray")) == "ray"
    assert choose_executor(PreprocessConfig(executor="local", ray_address="10.0.0.1:6379")) == "local"


@pytest.mark.parametrize("how", ["address", "env", "job", "initialized"])
def test_auto_is_ray_when_a_cluster_is_named_or_running(no_cluster, monkeypatch, how):
    cfg = PreprocessConfig(ray_address="10.0.0.1:6379" if how == "address" else None)
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    elif how == "job":
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    elif how == "initialized":
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert choose_executor(cfg) == "ray"


def test_auto_joins_a_ray_start_cluster_only_while_it_answers(no_cluster):
    """``ray start`` leaves its GCS address in <ray tmp>/ray/ray_current_cluster; a stale file is ignored."""
    (no_cluster / "ray").mkdir()
    addr_file = no_cluster / "ray" / "ray_current_cluster"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    addr_file.write_text(f"127.0.0.1:{port}")
    try:
        assert choose_executor(PreprocessConfig()) == "ray"
    finally:
        listener.close()
    assert choose_executor(PreprocessConfig()) == "local"  # nothing listens there any more
    addr_file.write_text("garbage")
    assert choose_executor(PreprocessConfig()) == "local"


def test_early_task_checks_the_lease_only_after_it_settled(tmp_path):
    """A task submitted before the driver confirmed its lease (local executor) waits out the settle time
    before its commit-time owner check: a run that lost the lease during the settle commits nothing."""
    img = tmp_path / "a.jpg"
    img.write_bytes(make_jpeg(64, 48))
    man = tmp_path / "m.jsonl"
    man.write_text(f'{{"url": "{img}", "caption": "one"}}\n')
    out = tmp_path / "out"
    cfg = PreprocessConfig(manifest=[str(man)], output=str(out), threads=2)
    mine = WriterLease(shards.Output(str(out)), settle_s=1.0)
    mine.out.ensure()
    mine.acquire(settle=False)
    assert mine.settles_at > time.time() + 0.5
    rows = [RawRow(source=str(man), source_index=0, values={"url": str(img), "caption": "one"})]
    task = ShardTask(0, rows, check_manifests([str(man)], cfg), lease_owner=mine.owner,
                     commit_not_before=mine.settles_at)

    def rival() -> None:  # another run writes the lease 0.3 s later, inside the settle window
        time.sleep(0.3)
        WriterLease(shards.Output(str(out))).acquire(force=True, settle=False)

    t = threading.Thread(target=rival)
    t.start()
    t0 = time.time()
    with pytest.raises(LeaseError):
        run_shard(cfg.to_dict(), task)
    t.join()
    assert time.time() - t0 >= 0.5  # it did wait for the settle time
    assert not (out / "train-000000_stats.json").exists() and not (out / "train-000000.tar").exists()

    # the same task with a confirmed lease (no wait) commits
    mine.acquire(force=True, settle=True)
    task.commit_not_before, task.lease_owner = 0.0, mine.owner
    stats = run_shard(cfg.to_dict(), task)
    assert stats["successes"] == 1 and (out / "train-000000_stats.json").exists()


def test_ray_run_that_loses_the_lease_while_it_settles_commits_nothing(tmp_path, monkeypatch, ray_local):
    """The Ray Data path also starts shards before the lease has settled (on a running cluster the settle
    delay idled every CPU), so a shard task waits out the settle time before its commit-time lease check.
    A rival that writes the lease inside the settle window, once a shard has its tar staged (ready to
    commit), wins: the driver stops with LeaseError and no shard commits."""
    from pipelines.run import preprocess

    man = tmp_path / "m.jsonl"
    with man.open("w") as f:
        for i in range(2):
            (tmp_path / f"{i}.jpg").write_bytes(make_jpeg(64, 48, seed=i))
            f.write(f'{{"url": "{tmp_path / f"{i}.jpg"}", "caption": "c{i}"}}\n')
    cfg = dict(manifest=[str(man)], samples_per_shard=1, threads=1, executor="ray", progress=False)
    # Ray Data's first run in a process starts its actors and worker imports (seconds): not part of this test
    assert preprocess(PreprocessConfig(output=str(tmp_path / "warm"), **cfg)).shards_written == [0, 1]
    out = tmp_path / "out"
    acquire, rivals = WriterLease.acquire, []

    def acquire_then_rival(self, force=False, settle=True):
        if rivals:  # the rival's own acquire
            return acquire(self, force=force, settle=settle)
        self.settle_s = 4.0
        acquire(self, force=force, settle=settle)
        ends = time.monotonic() + self.settle_s - 0.5

        def rival() -> None:  # a shard staged its tar: write the lease while that shard waits to commit
            while not list(out.glob(".staging-*/*.tar")) and not list(out.glob("*_stats.json")) \
                    and time.monotonic() < ends:
                time.sleep(0.005)
            WriterLease(self.out).acquire(force=True, settle=False)

        rivals.append(threading.Thread(target=rival))
        rivals[0].start()

    monkeypatch.setattr(WriterLease, "acquire", acquire_then_rival)
    with pytest.raises(LeaseError, match="lost the writer lease"):
        preprocess(PreprocessConfig(output=str(out), **cfg))
    rivals[0].join()
    assert not list(out.glob("*_stats.json")) and not list(out.glob("*.tar"))
