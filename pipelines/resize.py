"""Resize and encode images and video frames (img2dataset's resize modes, deterministic JPEG)."""

from __future__ import annotations

import io

from PIL import Image

from mplug2.data.boxes import Box, clip_box, scale_box

RESIZE_MODES = ("no", "border", "keep_ratio", "center_crop")


def scaled_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """The size :func:`resize` scales a ``w`` x ``h`` image to, before it crops or pads (``mode``)."""
    if mode == "no":
        return w, h
    if mode == "border":
        scale = size / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def _placement(w: int, h: int, size: int, mode: str) -> tuple[int, int, int, int, int, int]:
    """How :func:`resize` places a ``w`` x ``h`` source: scaled size, offset of the scaled image in the
    written one (pad > 0, crop < 0), written size."""
    nw, nh = scaled_size(w, h, size, mode)
    if mode == "border":
        return nw, nh, (size - nw) // 2, (size - nh) // 2, size, size
    if mode == "keep_ratio":
        return nw, nh, 0, 0, nw, nh
    return nw, nh, -((nw - size) // 2), -((nh - size) // 2), size, size


def resize_box(box: Box, w: int, h: int, size: int, mode: str) -> Box | None:
    """Where :func:`resize` puts the ``box`` (x, y, w, h in pixels of the ``w`` x ``h`` source): the same
    scale and pad / centre crop, clipped to the written image; None when the crop cut all of it off."""
    if mode == "no":
        return clip_box(box, w, h)
    nw, nh, dx, dy, out_w, out_h = _placement(w, h, size, mode)
    return clip_box(scale_box(box, nw / w, nh / h, dx, dy), out_w, out_h)


def source_box(box: Box, w: int, h: int, size: int, mode: str) -> Box | None:
    """The inverse of :func:`resize_box`: a ``box`` in the written image back in pixels of the ``w`` x ``h``
    source (a prediction on the padded square, in the user's image), clipped to it; None when it lies wholly
    in the padding."""
    if mode == "no":
        return clip_box(box, w, h)
    nw, nh, dx, dy, _, _ = _placement(w, h, size, mode)
    return clip_box(scale_box(box, w / nw, h / nh, -dx * w / nw, -dy * h / nh), w, h)


def resize(img: Image.Image, size: int, mode: str = "center_crop",
           resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize an RGB image to ``size`` with one of :data:`RESIZE_MODES`.

    - ``center_crop``: scale the short side to ``size``, crop the centre square;
    - ``keep_ratio``: scale the short side to ``size``, keep the aspect ratio;
    - ``border``: scale the long side to ``size``, pad to a black square;
    - ``no``: leave as is.

    ``resample`` defaults to bicubic; ``BOX`` is area averaging (OpenCV's INTER_AREA, what img2dataset
    uses to downscale), about 2x cheaper.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if mode == "no":
        return img
    w, h = img.size
    nw, nh = scaled_size(w, h, size, mode)
    scale = size / (max(w, h) if mode == "border" else min(w, h))
    img = img.resize((nw, nh), resample, reducing_gap=3.0 if scale < 0.5 else None)
    if mode == "border":
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    if mode == "keep_ratio":
        return img
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))

def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """Deterministic baseline JPEG (no EXIF, no timestamps): same pixels and Pillow give the same bytes."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False, progressive=False,
                            subsampling="4:2:0")
    return buf.getvalue()
