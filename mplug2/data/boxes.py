"""Region boxes (visual grounding) through every geometric step an image takes: the pipeline's resize, the
training crop and flip, the eval resize.

A box is ``(x, y, w, h)`` in pixels, COCO's convention (top-left corner, width, height). Shards carry it in
each sample's json under :data:`mplug2.data.shard_contract.BOX_FIELD`, in pixels of the written image; the
batch carries it normalised to the model input (:func:`normalised_xyxy`). Pure geometry (no I/O, no PIL), so
the pipeline and the loader map boxes by the same rules.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

__all__ = ["Box", "BoxError", "parse_box", "clip_box", "box_through_view", "visible_fraction", "normalised_xyxy",
           "scale_box", "transform_with_box"]

Box = tuple[float, float, float, float]


class BoxError(ValueError):
    """A box value that is not a box, or a box no training crop keeps (its message says why)."""


def parse_box(value: Any) -> Box:
    """A COCO ``[x, y, w, h]`` from a list / tuple or its JSON text (a csv cell); raises :class:`BoxError`
    for anything else: not four numbers, NaN / infinite, a negative corner, or a non-positive size."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BoxError(f"box {value[:60]!r} is not a JSON list [x, y, w, h]") from None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise BoxError(f"box {value!r} is not a list of 4 numbers [x, y, w, h]")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise BoxError(f"box {list(value)!r} has non-numeric values")
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BoxError(f"box {list(value)!r} has NaN or infinite values")
    if w <= 0 or h <= 0:
        raise BoxError(f"box {list(value)!r} has a non-positive width or height")
    if x < 0 or y < 0:
        raise BoxError(f"box {list(value)!r} starts left of / above the image")
    return x, y, w, h


def clip_box(box: Box, width: float, height: float) -> Box | None:
    """The part of ``box`` inside a ``width`` x ``height`` image; None when nothing of it is inside."""
    x, y, w, h = box
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def scale_box(box: Box, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> Box:
    """``box`` under ``(x, y) -> (x * sx + dx, y * sy + dy)`` (a resize plus a shift: pad or crop)."""
    x, y, w, h = box
    return x * sx + dx, y * sy + dy, w * sx, h * sy


def box_through_view(box: Box, view: Sequence[float], out_w: float, out_h: float, flip: bool = False
                     ) -> Box | None:
    """``box`` after cutting ``view`` = (left, top, width, height) out of the image, resizing the cut to
    ``out_w`` x ``out_h`` and mirroring it if ``flip`` (what :class:`~mplug2.data.transforms.VideoTransform`
    does to the pixels); clipped to the output, None when the view holds nothing of the box."""
    left, top, vw, vh = view
    sx, sy = out_w / vw, out_h / vh
    out = clip_box(scale_box(box, sx, sy, -left * sx, -top * sy), out_w, out_h)
    if out is None or not flip:
        return out
    x, y, w, h = out
    return out_w - x - w, y, w, h


def visible_fraction(box: Box, view: Sequence[float]) -> float:
    """The share of ``box``'s area inside ``view`` = (left, top, width, height)."""
    left, top, vw, vh = view
    x, y, w, h = box
    inside = clip_box((x - left, y - top, w, h), vw, vh)
    return 0.0 if inside is None else inside[2] * inside[3] / (w * h)


def normalised_xyxy(box: Box, width: float, height: float) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` as fractions of a ``width`` x ``height`` image (the batch's ``boxes`` layout)."""
    x, y, w, h = box
    return x / width, y / height, (x + w) / width, (y + h) / height


MIN_VISIBLE = 0.5     # a training crop must keep this share of the box's area (else it is drawn again)
CROP_DRAWS = 10


def transform_with_box(transform: Any, frames: Sequence[Any], box: Box, rng: Any
                       ) -> tuple[Any, Any, Box]:
    """Run ``transform.with_params`` on a clip whose region is ``box`` (pixels of the stored frames) and map
    the box as the pixels were mapped: the training crop is drawn again (up to :data:`CROP_DRAWS` times, on
    the same seeded ``rng``) until it keeps :data:`MIN_VISIBLE` of the box, so the referred object is never
    cut away; the flip mirrors the box. Returns (clip, params, box in pixels of the ``res`` x ``res`` clip).
    Raises :class:`BoxError` when no draw keeps the box."""
    width, height = frames[0].size
    res = transform.cfg.res
    for _ in range(CROP_DRAWS):
        clip, params = transform.with_params(frames, rng)
        view = params.crop or (0, 0, width, height)
        if params.crop is None or visible_fraction(box, view) >= MIN_VISIBLE:
            out = box_through_view(box, view, res, res, params.flip)
            if out is not None:
                return clip, params, out
    raise BoxError(f"no training crop in {CROP_DRAWS} draws keeps {MIN_VISIBLE:.0%} of the box {list(box)}")
