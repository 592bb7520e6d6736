"""RefCOCO-style manifests (image, expression / sentence, COCO bbox) through the real pipeline: the box is
mapped to the written image's pixels and travels in each sample's json; bad boxes are counted failures with
their reason, never a crash."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import PreprocessConfig
from pipelines.errors import ConfigError
from pipelines.run import preprocess
from pipelines.shards import read_tar


def _image(path, w=100, h=50):
    Image.new("RGB", (w, h), (90, 30, 30)).save(path, format="JPEG")
    return str(path)


def _samples(out: str) -> dict:
    from pathlib import Path

    got = {}
    for tar in sorted(Path(out).glob("train-*.tar")):
        got.update(read_tar(str(tar)))
    return {json.loads(s["json"])["source_index"]: (s["txt"].decode(), json.loads(s["json"])) for s in got.values()}


def test_refcoco_jsonl_boxes_are_mapped_and_bad_ones_counted(tmp_path):
    img = _image(tmp_path / "a.jpg")
    rows = [
        {"image": img, "sentence": "the man on the left", "bbox": [10, 10, 20, 10]},       # good
        {"image": img, "sentence": "the dog", "bbox": [60, 0, 40, 50]},                     # good, clipped by crop
        {"image": img, "sentence": "negative", "bbox": [10, 10, -5, 10]},                   # invalid_input
        {"image": img, "sentence": "words", "bbox": "ten ten"},                             # invalid_input
        {"image": img, "sentence": "outside", "bbox": [90, 10, 30, 10]},                    # invalid_input
        {"image": img, "sentence": "cut off", "bbox": [0, 0, 20, 20]},                      # filtered by the crop
    ]
    man = tmp_path / "refs.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = preprocess(PreprocessConfig(manifest=[str(man)], output=str(tmp_path / "out"), preset="refcoco",
                                    image_size=50, resize_mode="center_crop", executor="local", progress=False,
                                    max_failure_ratio=1.0))
    assert s.successes == 2 and s.failures == {"invalid_input": 3, "filtered": 1}, s.failures
    sidecar = {r["source_index"]: r for r in pq.read_table(tmp_path / "out" / "train-000000.parquet").to_pylist()}
    assert "cut off by the center_crop" in sidecar[5]["error_message"]
    assert "non-positive width" in sidecar[2]["error_message"] and "outside" in sidecar[4]["error_message"]
    assert sidecar[4]["source_box"] == [90, 10, 30, 10]      # kept for --retry-failed
    got = _samples(str(tmp_path / "out"))
    # center_crop 100x50 -> 50x50 cuts 25 px off the left: x 10 -> -15, clipped to 0 (5 px of 20 kept)
    assert got[0] == ("the man on the left", {**got[0][1], "box": [0.0, 10.0, 5.0, 10.0]})
    assert got[1][1]["box"] == [35.0, 0.0, 15.0, 50.0]
    assert "bbox" not in got[0][1]            # the manifest's box became `box`, not an extra column


def test_refcoco_csv_with_box_text_and_border_resize(tmp_path):
    img = _image(tmp_path / "b.jpg", 80, 40)
    man = tmp_path / "refs.csv"
    man.write_text('image,expression,bbox\n'
                   f'{img},the red one,"[8, 4, 16, 8]"\n'
                   f'{img},nan box,"[NaN, 4, 16, 8]"\n')
    s = preprocess(PreprocessConfig(manifest=[str(man)], output=str(tmp_path / "out"), preset="refcoco",
                                    image_size=40, resize_mode="border", executor="local", progress=False))
    assert s.successes == 1 and s.failures == {"invalid_input": 1}
    # border: scale 1/2 -> 40x20, padded 10 px above
    assert _samples(str(tmp_path / "out"))[0][1]["box"] == [4.0, 12.0, 8.0, 4.0]


def test_box_column_must_exist_and_needs_images(tmp_path):
    man = tmp_path / "refs.jsonl"
    man.write_text(json.dumps({"image": "x.jpg", "expression": "a"}) + "\n")
    with pytest.raises(ConfigError, match="box column 'bbox' not found"):
        preprocess(PreprocessConfig(manifest=[str(man)], output=str(tmp_path / "o"), preset="refcoco",
                                    executor="local", progress=False))
    with pytest.raises(ConfigError, match="--box-col needs --modality image"):
        preprocess(PreprocessConfig(manifest=[str(man)], output=str(tmp_path / "o2"), modality="video",
                                    box_col="bbox", executor="local", progress=False))
