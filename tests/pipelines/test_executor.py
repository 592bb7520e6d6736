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
