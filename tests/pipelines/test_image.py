"""Image decode/resize/encode: sizes per resize mode, EXIF, filters, failure reasons, determinism."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.errors import SampleError
from pipelines.image import ImageOptions, process_image
from tests.pipelines.conftest import make_jpeg


def _size(jpg: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img.size


@pytest.mark.parametrize("mode,expect", [("border", (256, 256)), ("center_crop", (256, 256)),
                                         ("keep_ratio", (341, 256)), ("no", (800, 600))])
def test_resize_modes_give_exact_sizes(mode, expect):
    out = process_image(make_jpeg(800, 600), ImageOptions(size=256, resize_mode=mode))
    assert _size(out.jpg) == expect
    assert (out.meta["original_width"], out.meta["original_height"]) == (800, 600)
    assert (out.meta["width"], out.meta["height"]) == expect


def test_draft_decode_stays_close_to_full_decode():
    """Reduced-DCT decoding must not visibly change the result (mean abs diff of a few levels)."""
    import numpy as np

    from pipelines.resize import resize

    # Photo-like content (smooth at the output scale). Detail near the output Nyquist limit differs more,
    # as between any two good downscalers.
    rng = np.random.default_rng(3)
    img = Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).resize((800, 600), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    src = buf.getvalue()
    for size in (128, 256):
        ref = np.asarray(resize(Image.open(io.BytesIO(src)).convert("RGB"), size, "border"), dtype=float)
        for resample in ("bicubic", "area"):  # area (box) is the faster default; both stay close
            out = process_image(src, ImageOptions(size=size, resample=resample)).jpg
            assert np.abs(np.asarray(Image.open(io.BytesIO(out)), dtype=float) - ref).mean() < 2.5


def test_exif_orientation_is_applied():
    out = process_image(make_jpeg(400, 200, exif_orientation=6), ImageOptions(size=100, resize_mode="keep_ratio"))
    assert _size(out.jpg) == (100, 200)  # rotated 90 degrees: portrait
    assert (out.meta["original_width"], out.meta["original_height"]) == (200, 400)


def test_transparent_png_is_composited_on_white():
    img = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = process_image(buf.getvalue(), ImageOptions(size=64, resize_mode="center_crop"))
    px = Image.open(io.BytesIO(out.jpg)).getpixel((32, 32))
    assert min(px) > 245


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(SampleError) as ei:
        process_image(data, ImageOptions(**kw))
    return ei.value.reason


def test_failure_reasons():
    good = make_jpeg(640, 480)
    assert _reason(b"") == "decode_error"
    assert _reason(b"<html>404 not found</html>") == "decode_error"
    assert _reason(good[: len(good) // 2]) == "decode_error"  # truncated
    assert _reason(good, min_image_size=500) == "too_small"
    assert _reason(make_jpeg(900, 100), max_aspect_ratio=3.0) == "filtered"
    assert _reason(good, max_pixels=1000) == "too_large"


def test_output_is_deterministic_and_records_source_hash():
    import hashlib

    src = make_jpeg(500, 400, seed=9)
    a, b = process_image(src, ImageOptions()), process_image(src, ImageOptions())
    assert a.jpg == b.jpg
    assert a.meta["sha256"] == hashlib.sha256(src).hexdigest() and a.meta["bytes"] == len(src)
