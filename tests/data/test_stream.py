"""Shard order, rank/worker partition, equal steps, and the exact cursor on raw batches (no DataLoader)."""

from __future__ import annotations

import itertools

import pytest

from mplug2.data.dataset_index import load_index
from mplug2.data.stream import CorpusStream, Cursor, ShardReadError, StreamConfig, iter_shard_samples
from mplug2 import storage


def _stream(shards, *, rank=0, world=1, streams=2, batch=3, seed=0, k=2, buf=4, corpus="c"):
    cfg = StreamConfig(batch_size=batch, seed=seed, streams_per_rank=streams, shards_in_flight=k, shuffle_buffer=buf)
    return CorpusStream(load_index(shards.prefix), corpus, cfg, rank=rank, world_size=world)


def _keys(raw_batch):
    return [s["__key__"] for s in raw_batch.samples]


def _epoch_batches(stream, epoch, num_workers=1):
    """All raw batches of one epoch for one rank, in the order an in-order DataLoader delivers them."""
    total = stream.plan(epoch).batches_per_rank
    its = [stream.iter_batches(Cursor(epoch, 0), worker=w, num_workers=num_workers) for w in range(num_workers)]
    return [next(its[b % num_workers]) for b in range(total)]


def test_shard_order_per_epoch_equal_across_ranks_and_seeded(image_shards):
    r0, r1 = _stream(image_shards, rank=0, world=2, streams=1), _stream(image_shards, rank=1, world=2, streams=1)
    orders = [r0.shard_order(e) for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1, "shards must be reshuffled each epoch"
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert [r1.shard_order(e) for e in range(4)] == orders, "every rank must see the same permutation"
    other_seed = _stream(image_shards, seed=1, streams=1)
    assert [other_seed.shard_order(e) for e in range(4)] != orders
    # rank r reads order[r::W]: the ranks' shard sets are disjoint and cover the epoch
    p = r0.plan(0)
    assert set(p.shards_for(0, 0)).isdisjoint(p.shards_for(1, 0))
    assert sorted(p.shards_for(0, 0) + p.shards_for(1, 0)) == list(range(8))


def test_too_few_shards_fails_at_startup(image_shards):
    with pytest.raises(ValueError, match=r"8 shards but needs at least .* = 9"):
        _stream(image_shards, world=3, streams=3)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        _stream(image_shards, world=2, streams=4, batch=30).plan(0)


@pytest.mark.parametrize("world,streams", [(2, 2), (3, 1), (1, 3)])
def test_equal_steps_and_each_sample_once_per_epoch(uneven_shards, world, streams):
    total = len(uneven_shards.all_keys)
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            s = _stream(uneven_shards, rank=rank, world=world, streams=streams, batch=4)
            per_rank.append([k for b in _epoch_batches(s, epoch) for k in _keys(b)])
            plan = s.plan(epoch)
        assert len({len(keys) for keys in per_rank}) == 1, "every rank must take the same number of steps"
        seen = [k for keys in per_rank for k in keys]
        assert len(seen) == len(set(seen)), "a sample was read twice within an epoch"
        assert set(seen) <= set(uneven_shards.all_keys)
        assert len(seen) + plan.dropped_samples == total, "samples skipped beyond the counted remainder"
        assert len(per_rank[0]) == plan.batches_per_rank * 4


def test_samples_are_shuffled_across_shards(image_shards):
    keys = [k for b in _epoch_batches(_stream(image_shards, streams=1, k=3, buf=8), 0) for k in _keys(b)]
    shards_in_first_batches = {k[:6] for k in keys[:9]}
    assert len(shards_in_first_batches) >= 2, "K shards should be interleaved"
    assert keys != sorted(keys)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_resume_at_every_position_equals_uninterrupted(image_shards, num_workers):
    """From any cursor, the next batches equal the uninterrupted run's (across the epoch boundary too)."""
    s = _stream(image_shards, streams=2, batch=3, k=2, buf=5)
    full = [_keys(b) for e in (0, 1) for b in _epoch_batches(s, e, num_workers)]
    per_epoch = s.plan(0).batches_per_rank
    positions = [(0, c) for c in range(per_epoch)] + [(1, 0), (1, 1)]
    for epoch, c in positions:
        fresh = _stream(image_shards, streams=2, batch=3, k=2, buf=5)
        start = epoch * per_epoch + c
        its = [fresh.iter_batches(Cursor(epoch, c), worker=w, num_workers=num_workers) for w in range(num_workers)]
        got = [_keys(next(its[j % num_workers])) for j in range(min(4, len(full) - start))]
        assert got == full[start:start + len(got)], f"resume at epoch {epoch} batch {c}"
    # the end-of-epoch cursor (epoch 0, all batches) is the start of epoch 1
    assert s.normalize(Cursor(0, per_epoch)) == Cursor(1, 0)


def test_missing_and_miscounted_shards_raise(tmp_path):
    from tests.data.shards_fixture import write_shards

    shards = write_shards(str(tmp_path), [4, 4])
    idx = load_index(shards.prefix)
    storage.remove(idx.shards[1].url)
    with pytest.raises(ShardReadError, match="missing"):
        list(iter_shard_samples(idx.shards[1]))
    from dataclasses import replace

    with pytest.raises(ValueError, match="manifest"):
        list(iter_shard_samples(replace(idx.shards[0], nsamples=5)))
    with pytest.raises(ValueError, match="more samples than the manifest"):
        list(iter_shard_samples(replace(idx.shards[0], nsamples=3)))
