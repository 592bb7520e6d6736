"""Model stages on a real local Ray cluster: ``--score-with`` (ITC score, ``--min-score``) and ``--caption-with``
with a tiny random-init model folder and CPU actors."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from pipelines import shards
from pipelines.config import PreprocessConfig
from pipelines.errors import ConfigError
from pipelines.image import ImageOptions, process_image
from pipelines.run import preprocess
from pipelines.verify import verify_dataset
from tests.pipelines.conftest import write_images


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from mplug2.cli import main

    out = tmp_path_factory.mktemp("model") / "tiny"
    assert main(["convert", "--preset", "tiny", "--out", str(out)]) == 0
    return str(out)


def _expected_scores(model_dir: str, images, captions, size: int) -> list[float]:
    """ITC similarity computed here, independently of the pipeline: the sample's own JPEG (same
    resize and encode as the pipeline) and its caption through the inference API."""
    from PIL import Image

    from mplug2.inference import Predictor

    import torch

    pred = Predictor.load(model_dir, device="cpu")
    opts = ImageOptions(size=size)
    pixels = torch.stack([pred.pixels_from_frames([Image.open(io.BytesIO(process_image(p.read_bytes(), opts).jpg))
                                                   .convert("RGB")]) for p in images])
    return (pred.embed_media(pixels) * pred.embed_texts(captions)).sum(-1).tolist()


def test_score_and_caption_stages_write_fields_and_count_low_score(tmp_path, tiny_model, ray_local):
    images = write_images(tmp_path / "img", 6)
    captions = [f"a photo number {i} of noise" for i in range(len(images))]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"url": str(p), "caption": c}) + "\n" for p, c in zip(images, captions)))
    expected = _expected_scores(tiny_model, images, captions, size=64)
    ranked = sorted(expected)
    half = len(ranked) // 2
    floor = (ranked[half - 1] + ranked[half]) / 2  # half fall below, none within float noise of the floor
    assert ranked[half] - ranked[half - 1] > 1e-4
    below = half
    assert 0 < below < len(images)

    out = tmp_path / "out"
    summary = preprocess(PreprocessConfig(
        manifest=[str(man)], output=str(out), image_size=64, samples_per_shard=4, threads=2, progress=False,
        score_with=tiny_model, min_score=floor, caption_with=tiny_model, caption_field="model_caption",
        model_batch_size=2, model_actors=1))

    assert summary.exit_code == 0 and summary.failures == {"low_score": below}
    assert summary.successes == len(images) - below
    assert any("Score" in name for name in summary.stages) and any("Caption" in name for name in summary.stages)
    assert "Ray Data stages" in summary.table() and "Map(ScoreStage)" in summary.table()
    assert verify_dataset(str(out)) == []
    written = {}
    for sid in (0, 1):
        for key, fields in shards.read_tar((out / shards.shard_name("train", sid, ".tar")).read_bytes()).items():
            written[key] = (json.loads(fields["json"]), fields["txt"].decode())
    assert len(written) == len(images) - below
    for meta, txt in written.values():
        i = meta["source_index"]
        assert meta["score"] == pytest.approx(expected[i], abs=1e-4) and meta["score"] >= floor
        assert isinstance(meta["model_caption"], str) and txt == captions[i]  # generated beside the original
    rows = pq.read_table(out / "train-000000.parquet").to_pylist() + pq.read_table(out / "train-000001.parquet").to_pylist()
    dropped = [r for r in rows if r["error_reason"] == "low_score"]
    assert len(dropped) == below and all(r["score"] < floor for r in dropped)


def test_model_stages_need_ray():
    with pytest.raises(ConfigError, match="executor ray"):
        PreprocessConfig(manifest=["m"], output="o", executor="local", score_with="m").validate()
    with pytest.raises(ConfigError, match="score-with"):
        PreprocessConfig(manifest=["m"], output="o", min_score=0.2).validate()
