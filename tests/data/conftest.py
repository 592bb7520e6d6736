"""Shard sets shared by the loader tests (written once per session; tiny images keep decoding cheap)."""

from __future__ import annotations

import pytest

from tests.data.shards_fixture import ShardSet, write_shards


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> ShardSet:
    """8 image shards of 12 samples, except one short shard (the contract allows the last to be short)."""
    root = tmp_path_factory.mktemp("img")
    return write_shards(str(root), [12, 12, 12, 12, 12, 12, 12, 7], size=(24, 20), captions_per_sample=3)


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> ShardSet:
    root = tmp_path_factory.mktemp("uneven")
    return write_shards(str(root), [5, 17, 9, 12, 3, 20, 11, 8, 14, 6], size=(16, 16))


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory) -> ShardSet:
    root = tmp_path_factory.mktemp("vid")
    return write_shards(str(root), [6, 6, 6, 6], frames=6, size=(24, 20))
