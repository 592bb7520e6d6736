"""Per-step corpus schedule: ratios, agreement across ranks, and exact resume of a two-corpus mixture."""

from __future__ import annotations

import pytest

from mplug2.data.loader import LoaderConfig, build_loader
from mplug2.data.mixing import MixedLoader, MixtureSchedule
from tests.data.test_loader import _tokenize


def test_ratios_within_tolerance_and_identical_on_all_ranks():
    weights = {"webvid": 0.2, "cc3m": 0.5, "coco": 0.3}
    rank0, rank1 = MixtureSchedule(weights, seed=5), MixtureSchedule(dict(reversed(weights.items())), seed=5)
    n = 20_000
    sched = [rank0.corpus_at(s) for s in range(n)]
    assert sched == [rank1.corpus_at(s) for s in range(n)], "ranks must agree on every step's corpus"
    counts = rank0.counts(0, n)
    for name, w in weights.items():
        assert abs(counts[name] / n - w) < 0.015, (name, counts[name] / n)
    assert sched != [MixtureSchedule(weights, seed=6).corpus_at(s) for s in range(n)]
    assert MixtureSchedule({"a": 1.0, "b": 0.0}).counts(0, 500) == {"a": 500}
    with pytest.raises(ValueError):
        MixtureSchedule({"a": -1.0, "b": 2.0})


def _mixed(image_shards, video_shards, num_workers):
    common = dict(batch_size=2, num_workers=num_workers, streams_per_rank=2, res=8, shuffle_buffer=4, seed=1)
    loaders = {
        "img": build_loader(LoaderConfig(prefix=image_shards.prefix, corpus="img", **common), tokenize=_tokenize),
        "vid": build_loader(LoaderConfig(prefix=video_shards.prefix, corpus="vid", num_frames=2, **common),
                            tokenize=_tokenize),
    }
    return MixedLoader(loaders, {"img": 0.6, "vid": 0.4}, seed=2)


def test_mixed_loader_homogeneous_batches_and_exact_resume(image_shards, video_shards):
    ref = _mixed(image_shards, video_shards, num_workers=0)
    batches = [next(ref) for _ in range(20)]
    for b in batches:
        assert b["pixels"].shape[2] == (1 if b["corpus"] == "img" else 2)   # one corpus per batch
    assert [b["corpus"] for b in batches] == [ref.schedule.corpus_at(s) for s in range(20)]
    # the video corpus (12 batches/epoch at batch 2) wraps an epoch within these steps in a longer run
    ref2 = _mixed(image_shards, video_shards, num_workers=0)
    for _ in range(11):
        next(ref2)
    state = ref2.state_dict()
    resumed = _mixed(image_shards, video_shards, num_workers=2)
    resumed.load_state_dict(state)
    got = [next(resumed)["keys"] for _ in range(9)]
    resumed.close()
    assert got == [b["keys"] for b in batches[11:20]]
    with pytest.raises(ValueError, match="weights or seed"):
        other = _mixed(image_shards, video_shards, num_workers=0)
        other.schedule = MixtureSchedule({"img": 0.5, "vid": 0.5}, seed=2)
        other.load_state_dict(state)
