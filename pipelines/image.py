"""Decode, filter, resize and re-encode one image (data-contract §5, image-text samples).

Speed matters here (it is most of the CPU time of an image corpus): JPEGs are decoded with
``Image.draft`` so libjpeg scales by 1/2, 1/4 or 1/8 in the DCT instead of decoding full size and
shrinking afterwards; the final resize still runs in Pillow, so the output size is exact.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from pipelines.errors import DECODE_ERROR, FILTERED, TOO_LARGE, TOO_SMALL, SampleError
from pipelines.resize import encode_jpeg, resize

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageOptions:
    size: int = 256
    resize_mode: str = "border"
    jpeg_quality: int = 95
    min_image_size: int = 0  # smaller side below this -> too_small
    max_aspect_ratio: float = math.inf  # long/short side above this -> filtered
    max_pixels: int = 178_956_970  # Pillow's decompression-bomb threshold (x2 raises)
    resample: str = "area"  # downscale filter: "area" (box, img2dataset's INTER_AREA) | "bicubic"


@dataclass
class ImageSample:
    jpg: bytes
    meta: dict  # original_width/height (display orientation), width/height (output), bytes, sha256


def _draft_target(w: int, h: int, size: int, mode: str) -> tuple[int, int] | None:
    """The smallest decode size that still leaves the final resize a downscale."""
    if mode == "no":
        return None
    if mode == "border":  # the long side ends at `size`
        scale = size / max(w, h)
    else:  # center_crop / keep_ratio: the short side ends at `size`
        scale = size / min(w, h)
    if scale >= 1:
        return None
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def process_image(data: bytes, opts: ImageOptions) -> ImageSample:
    """Bytes in, a re-encoded JPEG sample out; raises :class:`SampleError` (decode_error, too_small,
    filtered, too_large) for anything that must not become a sample."""
    if not data:
        raise SampleError(DECODE_ERROR, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            orientation = 1
            try:
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # a broken EXIF block does not make a broken image
                orientation = 1
            if orientation in _SWAPS_AXES:
                w, h = h, w
            if w * h > opts.max_pixels:
                raise SampleError(TOO_LARGE, f"{w}x{h} pixels over {opts.max_pixels}")
            if min(w, h) < max(1, opts.min_image_size):
                raise SampleError(TOO_SMALL, f"{w}x{h} below min_image_size {opts.min_image_size}")
            if max(w, h) / max(1, min(w, h)) > opts.max_aspect_ratio:
                raise SampleError(FILTERED, f"aspect ratio {max(w, h) / min(w, h):.2f} > {opts.max_aspect_ratio}")
            if img.format == "JPEG":
                target = _draft_target(w, h, opts.size, opts.resize_mode)
                if target is not None:
                    if orientation in _SWAPS_AXES:
                        target = (target[1], target[0])
                    img.draft("RGB", target)
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            shrinking = opts.size < (max(img.size) if opts.resize_mode == "border" else min(img.size))
            resample = Image.Resampling.BOX if opts.resample == "area" and shrinking else Image.Resampling.BICUBIC
            out = resize(img, opts.size, opts.resize_mode, resample)
            jpg = encode_jpeg(out, opts.jpeg_quality)
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(TOO_LARGE, str(exc)) from None
    except Exception as exc:  # UnidentifiedImageError, truncated data, libjpeg errors
        raise SampleError(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None
    meta = {"original_width": w, "original_height": h, "width": out.size[0], "height": out.size[1],
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return ImageSample(jpg=jpg, meta=meta)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as img2dataset does) rather than on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")
