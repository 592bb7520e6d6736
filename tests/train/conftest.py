"""Synthetic captioned corpora preprocessed into shards on the session's S3 server (built once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_shards(s3_server, ray_local, scratch_root):
    """``{"video": s3 prefix, "image": s3 prefix}``: 64 clips / 64 images, 16 per shard, tiny resolution."""
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_image_corpus, make_video_corpus

    root = scratch_root / "synthetic"
    vman = make_video_corpus(root, 64, seed=0, num_frames=12, size=48)
    iman = make_image_corpus(root, 64, seed=1, size=48)
    out = {"video": "s3://mplug2/corpora/synthetic-video", "image": "s3://mplug2/corpora/synthetic-image"}
    for modality, man in (("video", vman), ("image", iman)):
        summary = preprocess(PreprocessConfig(
            manifest=[str(man)], output=out[modality], modality=modality, samples_per_shard=16,
            num_frames=8, frame_size=32, image_size=32, resize_mode="center_crop", progress=False))
        assert summary.successes == 64, summary.failures
    return out
