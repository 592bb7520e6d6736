"""The tensor training transform (mplug2.data.augment) against the PIL reference (mplug2.data.transforms):
same draws, same pixels within a grey level or two, same output statistics; the flip reaches the caption on both
``augment_on`` settings; DCT-scaled decoding of large JPEGs; damaged pixel data is a skipped, counted sample."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mplug2.data.augment import OP_IDS, TensorTransform, augment_batch, finish_batch
from mplug2.data.collate import BatchBuilder
from mplug2.data import decode
from mplug2.data.decode import ClipDecoder, EncodedFrame, open_frame
from mplug2.data.stream import RawBatch
from mplug2.data.transforms import RANDAUG_OPS, AugParams, TransformConfig, VideoTransform

STD_GREY = 255 * 0.27          # one unit of the normalised output, in grey levels (CLIP std ~0.27)


def _photo(seed: int, size=(96, 80)) -> bytes:
    """A smooth random colour field with mild noise (photo-like), as JPEG bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    field = rng.integers(0, 256, size=(4, 5, 3)).astype(np.uint8)
    arr = np.asarray(Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int64)
    arr = np.clip(arr + rng.integers(-6, 7, size=arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _new(data: bytes) -> EncodedFrame:
    return open_frame(data)                      # header only, as the loader hands it over


def _both(cfg: TransformConfig, data: list[bytes], seed: int):
    ref, params_ref = VideoTransform(cfg).with_params([_pil(d) for d in data], random.Random(seed))
    fast = TensorTransform(cfg)
    clip, params = fast.with_params([_new(d) for d in data], random.Random(seed))
    return ref, fast.collate([clip], [params])["pixels"][0], params_ref, params


def test_same_draws_and_pixels_as_the_pil_reference():
    cfg = TransformConfig(res=48)
    data = [_photo(1), _photo(2)]
    diffs, ops_seen = [], set()
    for seed in range(24):
        ref, new, p_ref, p_new = _both(cfg, data, seed)
        assert p_ref == p_new                         # crop box, flip and ops: the very same draw
        assert new.shape == ref.shape == (3, 2, 48, 48) and new.dtype == torch.float32
        diffs.append(float((new - ref).abs().mean()) * STD_GREY)
        ops_seen |= {name for name, *_ in p_new.ops}
    assert len(ops_seen) >= 5, ops_seen
    assert np.median(diffs) < 1.5 and max(diffs) < 4.0, sorted(diffs)[-5:]


@pytest.mark.parametrize("name", [n for n in RANDAUG_OPS if n != "Identity"])
def test_each_op_matches_pil(name):
    cfg = TransformConfig(res=48)
    img = _pil(_photo(3))
    for sign in (-1.0, 1.0):
        params = AugParams(crop=(0, 0, img.width, img.height), ops=[(name, 5.0, sign)])
        ref = VideoTransform(cfg).apply(img, params)
        base = VideoTransform(cfg).apply(img, AugParams(crop=params.crop))
        px = torch.from_numpy(np.asarray(base).copy()).permute(2, 0, 1)[:, None][None]   # (1, 3, 1, H, W)
        ops = torch.tensor([[[OP_IDS[name], 5.0, sign]]])
        out = augment_batch(px, ops, torch.tensor([[0.0] * 3, [1 / 255.0] * 3]))           # identity norm
        diff = (out[0, :, 0].permute(1, 2, 0) - torch.from_numpy(np.asarray(ref).astype(np.float32))).abs()
        assert float(diff.mean()) < 1.5 and float(diff.quantile(0.95)) < 16, (name, sign, float(diff.mean()))


def test_output_statistics_match_the_reference():
    """Over many draws: per-channel mean / std of the outputs and the flip rate agree."""
    cfg = TransformConfig(res=24)
    data = [_photo(4, size=(40, 32))]
    ref_stats, new_stats, flips = [], [], 0
    for seed in range(64):
        ref, new, _, params = _both(cfg, data, seed)
        ref_stats.append(torch.stack([ref.mean(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3))]))
        new_stats.append(torch.stack([new.mean(dim=(1, 2, 3)), new.std(dim=(1, 2, 3))]))
        flips += params.flip
    r, n = torch.stack(ref_stats).mean(0), torch.stack(new_stats).mean(0)
    assert torch.allclose(r, n, atol=0.02), (r, n)
    assert 16 <= flips <= 48                        # Binomial(64, 0.5): 4 sigma


def _half_bright(seed: int) -> bytes:
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 30:] = 255                                 # right half white
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_flip_reaches_the_caption(augment_on):
    """Whatever runs the augmentation, a clip whose bright half moved to the left says "right" for "left"."""
    cfg = TransformConfig(res=16, crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5), randaug=False)
    samples = [{"__key__": f"000000_{i:06d}", "png": _half_bright(i), "txt": b"the white wall is on the right"}
               for i in range(24)]
    builder = BatchBuilder("c", TensorTransform(cfg, augment_on=augment_on), num_frames=1, seed=0,
                           tokenize=lambda texts, n: {"input_ids": [[1]] * len(texts),
                                                      "attention_mask": [[1]] * len(texts)})
    batch = finish_batch(builder(RawBatch(0, 0, samples)))
    assert batch["pixels"].dtype == torch.float32 and "aug_ops" not in batch
    left = batch["pixels"][:, :, 0, :, :8].mean(dim=(1, 2, 3))
    right = batch["pixels"][:, :, 0, :, 8:].mean(dim=(1, 2, 3))
    flipped = (left > right).tolist()
    assert 0 < sum(flipped) < len(flipped)
    for f, caption in zip(flipped, batch["captions"]):
        assert caption == ("the white wall is on the left" if f else "the white wall is on the right")


def test_device_path_equals_the_cpu_path():
    cfg = TransformConfig(res=24)
    samples = [{"__key__": f"000000_{i:06d}", **{f"f{j:03d}.jpg": _photo(10 * i + j) for j in range(3)},
                "txt": b"a clip"} for i in range(6)]
    tokenize = lambda texts, n: {"input_ids": [[1]] * len(texts), "attention_mask": [[1]] * len(texts)}  # noqa: E731
    on = {where: BatchBuilder("c", TensorTransform(cfg, augment_on=where), num_frames=3, seed=1, tokenize=tokenize)(
        RawBatch(0, 0, samples)) for where in ("cpu", "device")}
    assert on["device"]["pixels"].dtype == torch.uint8 and on["device"]["aug_ops"].shape == (6, cfg.randaug_n, 3)
    assert torch.allclose(finish_batch(on["device"])["pixels"], on["cpu"]["pixels"], atol=1e-5)


def test_large_jpeg_is_decoded_at_the_size_needed():
    """A 4x larger source decodes through libjpeg's DCT scaling and still matches the reference."""
    cfg = TransformConfig(res=32, crop_scale=(0.9, 1.0))
    data = _photo(5, size=(320, 256))
    crop = ClipDecoder().decode([_new(data)], (0, 0, 320, 256), 32)
    assert crop.shape[0] == 1 and crop.shape[1] == 3
    assert crop.shape[-1] < 320 and 320 % crop.shape[-1] == 0          # decoded at a DCT scale of 1/2 .. 1/8
    assert min(crop.shape[-2:]) >= 32
    diffs = [float((new - ref).abs().mean()) * STD_GREY for ref, new, *_ in (_both(cfg, [data], s) for s in range(8))]
    assert np.median(diffs) < 3.0, diffs


def test_damaged_pixel_data_is_a_skipped_sample_naming_its_shard_and_key():
    # The lazy decode reads pixels only in the transform: a cut-short JPEG found there is skipped and counted
    # like one found while reading the tar (mplug2.data.damage), with the shard and the sample key.
    good = _photo(6)
    bad = {"__key__": "000000_000000", "jpg": good[: len(good) // 3], "txt": b"cut short"}
    ok = {"__key__": "000000_000001", "jpg": good, "txt": b"a photo"}
    builder = BatchBuilder("c", TensorTransform(TransformConfig(res=16)), num_frames=1, seed=0,
                           tokenize=lambda texts, n: {"input_ids": [[1]] * len(texts),
                                                      "attention_mask": [[1]] * len(texts)})
    out = builder(RawBatch(0, 0, [bad], shards=["train-000000.tar"]))
    assert out.get("empty") and len(out["skipped"]) == 1
    shard, why = out["skipped"][0]
    assert shard == "train-000000.tar" and "000000_000000" in why
    out = builder(RawBatch(0, 1, [bad, ok], shards=["train-000000.tar"] * 2))
    assert out["keys"] == ["000000_000001", "000000_000001"]        # the hole filled: the batch keeps its size
    assert [s for s, _ in out["skipped"]] == ["train-000000.tar"]


@pytest.mark.parametrize("size, res", [((96, 80), 48), ((320, 256), 32)])   # full size; a DCT scale of 1/4
def test_simplejpeg_and_the_pillow_fallback_decode_the_same_pixels(monkeypatch, size, res):
    data = _photo(7, size=size)
    box = (3, 5, size[0] - 9, size[1] - 7)
    fast = ClipDecoder().decode([_new(data)], box, res).clone()
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = ClipDecoder().decode([_new(data)], box, res)
    assert fast.shape == slow.shape and torch.equal(fast, slow)


def test_cmyk_jpeg_and_png_frames_decode_through_pillow():
    arr = np.asarray(_pil(_photo(8)))
    for mode, fmt in (("CMYK", "JPEG"), ("RGB", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        frame = _new(buf.getvalue())
        assert not frame.turbo and frame.size == (96, 80)
        crop = ClipDecoder().decode([frame], (0, 0, 96, 80), 48)
        ref = np.asarray(_pil(buf.getvalue()))
        assert crop.shape == (1, 3, 80, 96) and torch.equal(crop[0].permute(1, 2, 0), torch.from_numpy(ref.copy()))


def test_clip_with_frames_of_two_sizes_is_a_skipped_sample():
    sample = {"__key__": "000000_000000", "f000.jpg": _photo(9), "f001.jpg": _photo(9, size=(64, 48)),
              "txt": b"a clip"}
    builder = BatchBuilder("c", TensorTransform(TransformConfig(res=16)), num_frames=2, seed=0,
                           tokenize=lambda texts, n: {"input_ids": [[1]] * len(texts),
                                                      "attention_mask": [[1]] * len(texts)})
    out = builder(RawBatch(0, 0, [sample], shards=["train-000000.tar"]))
    assert out.get("empty") and "differ in size" in out["skipped"][0][1]
