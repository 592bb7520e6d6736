"""Grounding boxes follow the pixels: the pipeline's resize modes, the training crop + flip (with the
expression's left/right swapped), the eval resize; bad boxes are named, not crashed on."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mplug2.data.augment import TensorTransform
from mplug2.data.boxes import BoxError, box_through_view, parse_box, transform_with_box
from mplug2.data.collate import BatchBuilder
from mplug2.data.decode import open_frame
from mplug2.data.stream import RawBatch
from mplug2.data.transforms import TransformConfig, VideoTransform
from pipelines.resize import resize, resize_box, source_box


@pytest.mark.parametrize("mode, size, expect", [
    ("border", 50, (5.0, 17.0, 10.0, 5.0)),        # scale 1/2, then padded 12 px at the top
    ("keep_ratio", 50, (10.0, 10.0, 20.0, 10.0)),  # short side already 50: unchanged
    ("center_crop", 50, (0.0, 10.0, 5.0, 10.0)),   # 25 px cut on the left: the box is clipped
    ("no", 50, (10.0, 10.0, 20.0, 10.0)),
])
def test_pipeline_resize_maps_the_box(mode, size, expect):
    assert resize_box((10, 10, 20, 10), 100, 50, size, mode) == expect


def test_pipeline_box_follows_the_resized_pixels():
    """A white rectangle drawn at the box lands where resize_box says, in every mode."""
    img = Image.new("RGB", (120, 80))
    img.paste((255, 255, 255), (70, 20, 110, 60))                        # box (70, 20, 40, 40)
    for mode in ("border", "keep_ratio", "center_crop"):
        out = np.asarray(resize(img, 60, mode).convert("L")) > 127
        ys, xs = np.nonzero(out)
        x, y, w, h = resize_box((70, 20, 40, 40), 120, 80, 60, mode)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx((x, y, x + w, y + h), abs=1), mode
    assert resize_box((0, 0, 10, 10), 120, 80, 60, "center_crop") is None   # wholly in the cut-off margin


def test_a_box_on_the_resized_image_maps_back_to_the_source():
    """``mplug2-model ground`` predicts on the pipeline's resized image and reports boxes in the user's pixels."""
    rng = random.Random(0)
    for mode in ("border", "keep_ratio", "center_crop", "no"):
        for _ in range(50):
            w, h, size = rng.randint(20, 900), rng.randint(20, 900), rng.choice([32, 224, 256])
            box = (rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(1, w / 2), rng.uniform(1, h / 2))
            moved = resize_box(box, w, h, size, mode)
            if moved is None:                                 # wholly cropped away: nothing to map back
                continue
            back = source_box(moved, w, h, size, mode)
            kept = source_box(resize_box((0, 0, w, h), w, h, size, mode), w, h, size, mode)   # the visible part
            x0, y0 = max(box[0], kept[0]), max(box[1], kept[1])
            x1, y1 = min(box[0] + box[2], kept[0] + kept[2]), min(box[1] + box[3], kept[1] + kept[3])
            assert back == pytest.approx((x0, y0, x1 - x0, y1 - y0), abs=1e-6), (mode, w, h, size, box)
    # in the padding of a wide image's square: nothing of the image there
    assert source_box((0, 0, 50, 10), 100, 50, 50, "border") is None


def test_view_crop_resize_and_flip_exact():
    assert box_through_view((10, 10, 20, 10), (0, 0, 50, 50), 25, 25) == (5.0, 5.0, 10.0, 5.0)
    assert box_through_view((10, 10, 20, 10), (0, 0, 50, 50), 25, 25, flip=True) == (10.0, 5.0, 10.0, 5.0)
    assert box_through_view((40, 10, 20, 10), (0, 0, 50, 50), 25, 25) == (20.0, 5.0, 5.0, 5.0)   # clipped
    assert box_through_view((60, 10, 20, 10), (0, 0, 50, 50), 25, 25) is None


@pytest.mark.parametrize("bad", [[1, 2, -3, 4], [1, 2, 3, 0], ["a", 2, 3, 4], [1, 2, 3], "nonsense",
                                 [float("nan"), 0, 1, 1], [-1, 0, 2, 2], [True, 0, 2, 2], None])
def test_bad_boxes_are_named(bad):
    with pytest.raises(BoxError):
        parse_box(bad)


def test_parse_box_accepts_lists_and_json_text():
    assert parse_box([1, 2, 3.5, 4]) == (1.0, 2.0, 3.5, 4.0)
    assert parse_box("[1, 2, 3, 4]") == (1.0, 2.0, 3.0, 4.0)


def _square(w=64, h=48, box=(36, 8, 20, 16)) -> Image.Image:
    img = Image.new("RGB", (w, h))
    x, y, bw, bh = box
    img.paste((255, 255, 255), (x, y, x + bw, y + bh))
    return img


@pytest.mark.parametrize("transform_type", [TensorTransform, VideoTransform])
def test_training_crop_and_flip_move_the_box_with_the_pixels(transform_type):
    box = (36, 8, 20, 16)
    tr = transform_type(TransformConfig(res=32, train=True, randaug=False))
    flips = 0
    for seed in range(12):
        img = _square(box=box)
        if transform_type is TensorTransform:     # the tensor path opens lazily from encoded bytes
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            img = open_frame(buf.getvalue())
        clip, params, (x, y, w, h) = transform_with_box(tr, [img], box, random.Random(seed))
        flips += params.flip
        px = clip[:, 0].float()
        if transform_type is TensorTransform:
            px = px / 255
        else:                                      # undo the normalisation
            px = px * torch.tensor(tr.cfg.std).view(3, 1, 1) + torch.tensor(tr.cfg.mean).view(3, 1, 1)
        ys, xs = np.nonzero((px.mean(0) > 0.5).numpy())
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx((x, y, x + w, y + h), abs=1.5), seed
    assert 0 < flips < 12                          # both sides of the flip were checked


def test_batch_builder_mirrors_box_and_expression_together():
    """A flipped sample's box is mirrored and its expression's left/right swapped; the eval transform only
    scales the box. Boxes reach the batch as normalised (x1, y1, x2, y2)."""
    buf = io.BytesIO()
    _square(box=(0, 0, 16, 48)).save(buf, format="PNG")            # a bar on the left edge
    meta = {"box": [0, 0, 16, 48]}
    raw = {"__key__": "000000_000000", "png": buf.getvalue(), "txt": b"the bar on the left",
           "json": json.dumps(meta).encode()}
    tok = lambda texts, n: {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long),   # noqa: E731
                            "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}
    seen = set()
    for seed in range(16):
        b = BatchBuilder("g", TensorTransform(TransformConfig(res=32, randaug=False)), num_frames=1, seed=seed,
                         tokenize=tok)(RawBatch(0, 0, [raw]))
        x1, _, x2, _ = b["boxes"][0].tolist()
        flipped = b["captions"][0] == "the bar on the right"
        assert b["captions"][0] in ("the bar on the left", "the bar on the right")
        assert (x2 == pytest.approx(1.0)) if flipped else (x1 == pytest.approx(0.0)), (seed, b["boxes"])
        seen.add(flipped)
    assert seen == {True, False}
    ev = BatchBuilder("g", VideoTransform(TransformConfig(res=32, train=False)), num_frames=1, seed=0,
                      tokenize=tok)(RawBatch(0, 0, [raw]))
    assert ev["boxes"].tolist() == [[0.0, 0.0, 0.25, 1.0]] and ev["captions"] == ["the bar on the left"]


def test_a_sample_with_a_bad_box_is_skipped_and_counted():
    buf = io.BytesIO()
    _square().save(buf, format="PNG")
    good = {"__key__": "000000_000000", "png": buf.getvalue(), "txt": b"a", "json": b'{"box": [1, 1, 8, 8]}'}
    bad = {**good, "__key__": "000000_000001", "json": b'{"box": [1, 1, -8, 8]}'}
    tok = lambda texts, n: {"input_ids": torch.zeros(len(texts), 3, dtype=torch.long),   # noqa: E731
                            "attention_mask": torch.ones(len(texts), 3, dtype=torch.long)}
    b = BatchBuilder("g", TensorTransform(TransformConfig(res=32, randaug=False)), num_frames=1, seed=0,
                     tokenize=tok)(RawBatch(0, 0, [good, bad], shards=["s0", "s0"]))
    assert len(b["skipped"]) == 1 and "non-positive width" in b["skipped"][0][1]
    assert b["boxes"].shape == (2, 4) and b["keys"] == ["000000_000000"] * 2    # the hole filled by a repeat
