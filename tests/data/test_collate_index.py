"""Manifest reading, sample decoding and batch assembly, video frames included."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mplug2 import storage
from mplug2.data.collate import BatchBuilder, SampleError, decode_sample, default_tokenizer, key_to_id
from mplug2.data.dataset_index import DatasetIndexError, load_index
from mplug2.data.loader import LoaderConfig, build_loader
from mplug2.data.stream import RawBatch, iter_shard_samples
from mplug2.data.transforms import TransformConfig, VideoTransform
from tests.data.shards_fixture import write_shards


def test_index_prefers_dataset_json_and_falls_back_to_sizes(tmp_path):
    shards = write_shards(str(tmp_path / "a"), [3, 2])
    idx = load_index(shards.prefix)
    assert idx.source == "dataset.json" and [s.nsamples for s in idx.shards] == [3, 2]
    assert idx.shards[0].sha256 and idx.shards[1].url.endswith("train-000001.tar")
    only_sizes = write_shards(str(tmp_path / "b"), [4], write_dataset_json=False)
    assert load_index(only_sizes.prefix).source == "sizes.json"
    with pytest.raises(DatasetIndexError, match="neither"):
        load_index(str(tmp_path / "missing"))
    bad = json.loads(storage.read_bytes(f"{shards.prefix}/dataset.json"))
    bad["format_version"] = 2
    storage.atomic_write(f"{shards.prefix}/dataset.json", json.dumps(bad).encode())
    with pytest.raises(DatasetIndexError, match="format_version"):
        load_index(shards.prefix)
    storage.atomic_write(f"{shards.prefix}/dataset.json", json.dumps(
        {"format_version": 1, "shards": [{"name": "train-000000.tar", "nsamples": 3},
                                         {"name": "train-000002.tar", "nsamples": 2}]}).encode())
    with pytest.raises(DatasetIndexError, match="gaps"):
        load_index(shards.prefix)


def test_key_ids_are_stable_per_source():
    assert key_to_id("000012_000345") == 12_000_345
    assert key_to_id("000012_000345_002") == key_to_id("000012_000345_007")
    assert key_to_id("custom-key") == key_to_id("custom-key") != key_to_id("other")


def test_video_batch_subsamples_frames_and_picks_captions(video_shards):
    loader = build_loader(LoaderConfig(prefix=video_shards.prefix, corpus="vid", batch_size=2, num_workers=0,
                                       res=16, num_frames=3, shuffle_buffer=1), tokenize=default_tokenizer())
    b = next(loader)
    assert b["pixels"].shape == (2, 3, 3, 16, 16)
    assert b["input_ids"][:, 0].tolist() == [101, 101]        # real BERT vocab: [CLS]
    assert b["captions"][0].startswith("a photo of sample ")


def test_multiple_captions_are_sampled_and_cleaned(image_shards):
    idx = load_index(image_shards.prefix)
    raw = list(iter_shard_samples(idx.shards[0]))[:4]
    builder = BatchBuilder("c", VideoTransform(TransformConfig(res=8)), num_frames=1, seed=0,
                           tokenize=lambda t, n: {"input_ids": torch.zeros(len(t), 2), "attention_mask": torch.ones(len(t), 2)})
    chosen = set()
    for epoch in range(12):
        out = builder(RawBatch(epoch, 0, raw))
        chosen |= {c.rsplit(" ", 1)[-1] for c in out["captions"]}
        assert all(c.startswith("a photo of sample") and "!" not in c for c in out["captions"])
    assert chosen == {"0", "1", "2"}
    assert torch.equal(builder(RawBatch(3, 0, raw))["pixels"], builder(RawBatch(3, 0, raw))["pixels"])


def test_bad_samples_raise_clear_errors(image_shards):
    good = list(iter_shard_samples(load_index(image_shards.prefix).shards[0]))[0]
    rng = random.Random(0)
    with pytest.raises(SampleError, match="no image field"):
        decode_sample({"__key__": "k", "txt": b"x"}, num_frames=1, train=True, rng=rng)
    with pytest.raises(SampleError, match="not a decodable image"):
        decode_sample({**good, "jpg": b"not a jpeg"}, num_frames=1, train=True, rng=rng)
    with pytest.raises(SampleError, match="no caption"):
        decode_sample({"__key__": "k", "jpg": good["jpg"]}, num_frames=1, train=True, rng=rng)


def test_flipped_clips_get_mirrored_captions_and_answers():
    """A clip whose left half is red and right half blue: after the batch builder, a sample whose pixels come
    out mirrored (blue on the left) says "right" where its caption said "left", and its answer flips too."""
    import io

    import numpy as np
    from PIL import Image

    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8, 0] = 255
    arr[:, 8:, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    raw = [{"__key__": f"{i:06d}_000000", "png": buf.getvalue(),
            "json": json.dumps({"captions": ["a red square moving left"], "answer": "left"}).encode()}
           for i in range(24)]
    cfg = TransformConfig(res=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaug=False)
    builder = BatchBuilder("c", VideoTransform(cfg), num_frames=1, seed=0,
                           tokenize=lambda t, n: {"input_ids": torch.zeros(len(t), 2), "attention_mask": torch.ones(len(t), 2)})
    out = builder(RawBatch(0, 0, raw))
    red_left = out["pixels"][:, 0, 0, :, :4].mean(dim=(1, 2)) > out["pixels"][:, 0, 0, :, -4:].mean(dim=(1, 2))
    assert 0 < int(red_left.sum()) < len(raw)                  # both flipped and unflipped samples occur
    for unflipped, caption, answer in zip(red_left.tolist(), out["captions"], out["answers"]):
        assert (caption, answer) == (("a red square moving left", "left") if unflipped
                                     else ("a red square moving right", "right"))
