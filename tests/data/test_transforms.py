"""CLIP normalisation, consistent video augmentation, eval determinism, frame subsampling, text cleaning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mplug2.data.text import pre_caption, pre_question
from mplug2.data.transforms import (CLIP_MEAN, CLIP_STD, TransformConfig, VideoTransform, sample_frame_indices)


def _noise(seed, size=(40, 30)):
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def test_clip_mean_std_normalisation():
    mean_px = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    t = VideoTransform(TransformConfig(res=8, train=False))
    out = t([Image.new("RGB", (20, 10), mean_px)])
    assert out.shape == (3, 1, 8, 8)
    assert out.abs().max() < 0.01                       # mean colour -> ~0
    white = t([Image.new("RGB", (20, 10), (255, 255, 255))])
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(white[:, 0, 0, 0], expected, atol=1e-5)


def test_eval_is_deterministic_and_resizes_to_square():
    t = VideoTransform(TransformConfig(res=12, train=False))
    frames = [_noise(i) for i in range(3)]
    a, b = t(frames), t(frames, random.Random(1))
    assert a.shape == (3, 3, 12, 12) and torch.equal(a, b)


def test_train_augmentation_is_consistent_across_frames():
    t = VideoTransform(TransformConfig(res=16, train=True))
    frame = _noise(0)
    for seed in range(20):
        clip = t([frame] * 4, random.Random(seed))
        assert all(torch.equal(clip[:, 0], clip[:, i]) for i in range(1, 4)), f"frames differ (seed {seed})"
    # different frames: each output frame equals that frame transformed alone with the same draw
    frames = [_noise(i) for i in range(3)]
    clip = t(frames, random.Random(7))
    for i, f in enumerate(frames):
        alone = t([f], random.Random(7))
        assert torch.equal(clip[:, i], alone[:, 0])


def test_train_augmentation_is_random_per_sample_and_reproducible():
    t = VideoTransform(TransformConfig(res=16, train=True))
    frame = _noise(0)
    outs = [t([frame], random.Random(s)) for s in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) == 8
    assert torch.equal(t([frame], random.Random(3)), outs[3])
    with pytest.raises(ValueError, match="seeded rng"):
        t([frame])
    ops = [name for s in range(200) for name, *_ in t.draw(40, 30, random.Random(s)).ops]
    assert {"Rotate", "ShearX", "Contrast", "TranslateY"} <= set(ops)
    crops = [t.draw(40, 30, random.Random(s)).crop for s in range(200)]
    areas = [w * h / (40 * 30) for _, _, w, h in crops]
    assert 0.45 <= min(areas) and max(areas) <= 1.0 + 1e-9


def test_crop_scale_bounds_the_training_crop():
    """``crop_scale`` is the area range of the training crop: a caption that names a size or a speed relative to
    the frame (the synthetic corpus) stays true only where the crop cannot magnify past its classes' margin."""
    for scale in ((0.5, 1.0), (0.8, 1.0)):
        t = VideoTransform(TransformConfig(res=16, train=True, randaug=False, crop_scale=scale))
        crops = [t.draw(40, 30, random.Random(s)).crop for s in range(300)]
        areas = [w * h / (40 * 30) for _, _, w, h in crops]
        assert scale[0] - 0.02 <= min(areas) < scale[0] + 0.1, (scale, min(areas))
        assert max(areas) <= 1.0 + 1e-9, (scale, max(areas))
    whole = VideoTransform(TransformConfig(res=16, train=True, randaug=False, crop_scale=(1.0, 1.0)))
    assert {whole.draw(32, 32, random.Random(s)).crop for s in range(50)} == {(0, 0, 32, 32)}


def test_frame_subsampling():
    rng = random.Random(0)
    assert sample_frame_indices(16, 8, train=False, rng=rng) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sample_frame_indices(3, 5, train=False, rng=rng) == [0, 1, 2, 2, 2]
    for _ in range(50):
        idx = sample_frame_indices(16, 4, train=True, rng=rng)
        assert [i // 4 for i in idx] == [0, 1, 2, 3]            # one frame from each segment
    assert len({tuple(sample_frame_indices(32, 4, train=True, rng=rng)) for _ in range(20)}) > 1


def test_text_cleaning():
    assert pre_caption("A Man, riding a Horse!!  (at dusk)") == "a man riding a horse at dusk"
    assert pre_caption("well-known   sci/fi <person>") == "well known sci fi person"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_question("What's   the colour?") == "whats the colour"
    with pytest.raises(TypeError):
        pre_caption(None)  # type: ignore[arg-type]


def test_left_right_swap_keeps_case_and_only_touches_whole_words():
    from mplug2.data.text import swap_left_right

    assert swap_left_right("a red circle moving left") == "a red circle moving right"
    assert swap_left_right("Turn RIGHT at the leftmost door, Left-hand side") == \
        "Turn LEFT at the rightmost door, Right-hand side"
    assert swap_left_right("rightwards and lefts") == "leftwards and rights"
    assert swap_left_right("bright lights, copyright, leftover") == "bright lights, copyright, leftover"
    assert swap_left_right(swap_left_right("left right up down")) == "left right up down"
    # the synthetic corpus' attributes: only the direction is mirrored, never size or speed
    from pipelines.synthetic import SIZES, SPEEDS, ClipSpec

    for size in SIZES:
        for speed in SPEEDS:
            spec = ClipSpec("red", "circle", "left", 0, size=size, speed=speed)
            assert swap_left_right(spec.caption) == ClipSpec("red", "circle", "right", 0, size=size, speed=speed).caption
            assert swap_left_right(ClipSpec("red", "circle", "up", 0, size=size, speed=speed).caption) == \
                ClipSpec("red", "circle", "up", 0, size=size, speed=speed).caption
