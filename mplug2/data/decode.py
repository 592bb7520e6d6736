"""Frame bytes -> uint8 pixels of one clip's crop, decoded at the size the crop needs, into a buffer the
loader worker reuses.

Why: after the tensor augmentation (:mod:`mplug2.data.augment`), JPEG decoding and the copies around it were
most of the loader's CPU. ``simplejpeg`` (libjpeg-turbo, the decoder Pillow's wheels bundle too) parses the
header in C, decodes straight into a numpy buffer (Pillow decodes into its own image and copies out through
``tobytes``), and applies libjpeg's DCT-domain scaling (1/2, 1/4, 1/8) when the crop keeps ``res`` pixels per
side after it. Other scales (7/8, 3/4 ...) exist in libjpeg-turbo but decode slower than a full decode
(no SIMD IDCT), so only powers of two are used, as Pillow's ``draft`` does. Pixels equal Pillow's
(both: libjpeg-turbo, accurate integer IDCT, smooth chroma upsampling).

Pillow stays the fallback: frames that are not JPEG (PNG, WebP), CMYK / YCCK JPEGs (Pillow's Adobe
inversion), and installs without simplejpeg.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

try:
    import simplejpeg
except ImportError:                       # optional: Pillow decodes everything, more slowly
    simplejpeg = None

__all__ = ["EncodedFrame", "open_frame", "dct_scale", "ClipDecoder"]

_JPEG_SOI = b"\xff\xd8"
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray"})     # simplejpeg decodes these to RGB as Pillow does


@dataclass(frozen=True, eq=False)
class EncodedFrame:
    """One frame's encoded bytes and its size from the header: what the crop draw needs, no pixels yet."""

    data: bytes
    size: tuple[int, int]          # (width, height), as PIL's ``Image.size``
    turbo: bool                    # simplejpeg decodes it (a YCbCr or greyscale JPEG)
    jpeg: bool                     # a JPEG at all (DCT scaling applies)


def _check_pixels(width: int, height: int) -> None:
    """Pillow's decompression-bomb limit, for headers parsed without Pillow."""
    limit = Image.MAX_IMAGE_PIXELS
    if width < 1 or height < 1:
        raise OSError(f"image header gives an empty size {width}x{height}")
    if limit and width * height > 2 * limit:
        raise Image.DecompressionBombError(
            f"image size ({width * height} pixels) exceeds limit of {2 * limit} pixels, "
            "could be decompression bomb DOS attack.")


def open_frame(data: bytes) -> EncodedFrame:
    """Parse the header of an encoded frame. Raises OSError (not a decodable image) or
    ``PIL.Image.DecompressionBombError``; pixel errors surface later, in :meth:`ClipDecoder.decode`."""
    if simplejpeg is not None and data[:2] == _JPEG_SOI:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise OSError(f"cannot read the JPEG header ({exc})") from exc
        _check_pixels(width, height)
        return EncodedFrame(data, (width, height), turbo=colorspace in _TURBO_COLORSPACES, jpeg=True)
    with Image.open(io.BytesIO(data)) as img:          # UnidentifiedImageError is an OSError
        return EncodedFrame(data, img.size, turbo=False, jpeg=img.format == "JPEG")


def dct_scale(size: tuple[int, int], box: tuple[int, int, int, int], res: int) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) that still leaves ``res`` pixels across the crop ``box``
    (left, top, width, height in source pixels): Pillow's ``draft`` rule for a request of that size."""
    (w0, h0), (_, _, cw, ch) = size, box
    want_w, want_h = max(1, -(-w0 * res // cw)), max(1, -(-h0 * res // ch))
    fits = min(w0 // want_w, h0 // want_h)
    return next((k for k in (8, 4, 2) if fits >= k), 1)


class ClipDecoder:
    """Decodes the frames of one clip into one reusable ``(T, H, W, 3)`` uint8 buffer and returns the crop.

    One per worker (it lives on the transform); the view it returns is valid until the next ``decode``.
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, np.uint8)

    def _slots(self, n: int, h: int, w: int) -> np.ndarray:
        need = n * h * w * 3
        if self._buf.size < need:
            self._buf = np.empty(need, np.uint8)
        return self._buf[:need].reshape(n, h, w, 3)

    def decode(self, frames: Sequence[EncodedFrame], box: tuple[int, int, int, int], res: int,
               *, scale: bool = True) -> torch.Tensor:
        """``(T, 3, h, w)`` uint8 view (channels-last strides) of ``box`` in every frame, decoded at the DCT
        scale that keeps ``res`` pixels across the box (``scale=False``: full size). Frames repeated in
        ``frames`` (padding of short clips) are decoded once. Raises OSError for undecodable pixels."""
        w0, h0 = frames[0].size
        k = dct_scale((w0, h0), box, res) if scale and frames[0].jpeg else 1
        w, h = -(-w0 // k), -(-h0 // k)
        slots = self._slots(len(frames), h, w)
        first: dict[int, int] = {}
        for t, frame in enumerate(frames):
            if id(frame) in first:
                slots[t] = slots[first[id(frame)]]
                continue
            first[id(frame)] = t
            _decode_into(frame, slots[t], k)
        left, top, cw, ch = box
        sx, sy = w / w0, h / h0
        x0, y0 = int(round(left * sx)), int(round(top * sy))
        x1 = max(x0 + 1, min(w, int(round((left + cw) * sx))))
        y1 = max(y0 + 1, min(h, int(round((top + ch) * sy))))
        return torch.from_numpy(slots[:, y0:y1, x0:x1]).permute(0, 3, 1, 2)


def _decode_into(frame: EncodedFrame, out: np.ndarray, k: int) -> None:
    """Decode ``frame`` at 1/``k`` scale into ``out`` (h, w, 3), which has exactly the scaled size."""
    h, w = out.shape[:2]
    if frame.turbo and simplejpeg is not None:
        try:
            got = simplejpeg.decode_jpeg(frame.data, colorspace="RGB", min_height=h, min_width=w, buffer=out)
        except ValueError as exc:            # truncated or corrupt entropy data (strict: no grey fill-in)
            raise OSError(f"JPEG data is damaged ({exc})") from exc
        if got.shape != out.shape:
            raise OSError(f"JPEG decoded to {got.shape[1]}x{got.shape[0]}, expected {w}x{h}")
        return
    with Image.open(io.BytesIO(frame.data)) as img:
        if k > 1:         # Pillow's draft picks the same scale for a request of the scaled-down size
            img.draft("RGB", (max(1, img.size[0] // k), max(1, img.size[1] // k)))
        pixels = img.convert("RGB") if img.mode != "RGB" else img
        if pixels.size != (w, h):
            raise OSError(f"frame decoded to {pixels.size[0]}x{pixels.size[1]}, expected {w}x{h}")
        np.copyto(out, np.asarray(pixels))
