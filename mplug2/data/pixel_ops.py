"""RandAugment's ops (``model-spec.md`` §6) on batches of clips ``(b, 3, T, H, W)`` of uint8-valued floats, in
place, on any device: the tensor counterpart of :data:`mplug2.data.transforms.RANDAUG_OPS`.

Every op rounds back to uint8 values, as PIL does after each op. What keeps them cheap on a loader CPU:

- no fresh multi-MB tensors: a new buffer costs more in page faults than the op that fills it, so work
  buffers are reused (:func:`_scratch`) and blends are one fused ``lerp_``;
- translations are two-tap shifts (bilinear along one axis), not a 2-D ``grid_sample``;
- shear and rotation sample a ``grid_sample`` grid built once per (op, level, sign, size) and cached;
- Contrast's mean grey comes from the channel means (the luma weights are linear), not a luma image.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from mplug2.data.transforms import MAX_LEVEL, RANDAUG_OPS

__all__ = ["OP_IDS", "apply_op_", "normalise_"]

OP_IDS = {name: i for i, name in enumerate(RANDAUG_OPS)}
_WARP_OPS = frozenset(OP_IDS[n] for n in ("ShearX", "ShearY", "Rotate"))
_SHIFT_OPS = frozenset(OP_IDS[n] for n in ("TranslateX", "TranslateY"))
_FILL = 128.0                                     # PIL fillcolor of the reference ops
_LUMA = (0.299, 0.587, 0.114)                     # PIL's "L" conversion
_SCRATCH_MAX_BYTES = 32 << 20                     # larger (batch-sized) buffers: allocated per call
_scratch_cache: dict[str, torch.Tensor] = {}


def _scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reusable CPU work buffer (uninitialised). On accelerators the caching allocator already reuses memory."""
    if like.device.type != "cpu" or math.prod(shape) * like.element_size() > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    buf = _scratch_cache.get(name)
    if buf is None or buf.dtype != like.dtype or buf.numel() < math.prod(shape):
        buf = _scratch_cache[name] = torch.empty(math.prod(shape), dtype=like.dtype)
    return buf[:math.prod(shape)].view(shape)


def _per_clip(x: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor | float:
    return value if isinstance(value, float) else value.view(-1, *([1] * (x.dim() - 1)))


def _enhance_factor(levels: list[float], device: torch.device) -> torch.Tensor | float:
    factors = [lv / MAX_LEVEL * 1.8 + 0.1 for lv in levels]                  # ALBEF enhance_level_to_args
    return factors[0] if len(set(factors)) == 1 else torch.tensor(factors, device=device)


def _round_clamp_(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255)


def _brightness_(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    # ImageEnhance.Brightness: blend with black, i.e. a scale (factor > 0)
    return _round_clamp_(x.mul_(_per_clip(x, factor)))


def _contrast_(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    # ImageEnhance.Contrast: blend with the frame's mean grey, int(mean of the "L" image + 0.5); the mean of
    # luma is luma of the channel means (PIL rounds luma per pixel first: < 0.5 grey level apart)
    means = x.mean(dim=(-2, -1))                                               # (b, 3, T)
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1)
    grey = torch.floor((means * luma).sum(1) + 0.5)[:, None, :, None, None]   # (b, 1, T, 1, 1)
    f = _per_clip(x, factor)
    return _round_clamp_(x.lerp_(grey.expand_as(x), 1 - f))                   # f * x + (1 - f) * grey


def _sharpness_(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    # ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, others 1, /13); PIL leaves the
    # one-pixel border unfiltered, where the blend is the identity. The 3x3 sum as two shifted 1-D sums
    # (avg_pool2d / conv2d CPU kernels are 10-100x slower for this shape).
    *lead, h, w = x.shape
    rows = _scratch("rows", (*lead, h, w - 2), x)
    torch.add(x[..., :-2], x[..., 1:-1], out=rows).add_(x[..., 2:])
    smooth = _scratch("smooth", (*lead, h - 2, w - 2), x)
    torch.add(rows[..., :-2, :], rows[..., 1:-1, :], out=smooth).add_(rows[..., 2:, :])
    inner = x[..., 1:-1, 1:-1]
    smooth.add_(inner, alpha=4.0).div_(13.0).round_()
    inner.lerp_(smooth, 1 - _per_clip(x, factor))                               # f * x + (1 - f) * smooth
    _round_clamp_(inner)
    return x


def _shift_(x: torch.Tensor, offset: float, dim: int) -> torch.Tensor:
    """out[i] = x(i + offset) along ``dim``, bilinear, grey outside: PIL's translate (inverse map), as
    ``grid_sample`` with zero padding around the grey-centred frame computes it."""
    n = x.shape[dim]
    k = math.floor(offset)
    a = offset - k
    centred = x.sub_(_FILL)
    acc = _scratch("shift", tuple(x.shape), x).zero_()
    for tap, weight in ((k, 1.0 - a), (k + 1, a)):
        lo, hi = max(0, -tap), min(n, n - tap)                 # outputs whose tap lands inside the frame
        if weight and lo < hi:
            acc.narrow(dim, lo, hi - lo).add_(centred.narrow(dim, lo + tap, hi - lo), alpha=weight)
    return torch.add(acc, _FILL, out=x).round_()               # a convex blend of in-range values: no clamp


def _affine_coeffs(op: int, level: float, sign: float, w: int, h: int) -> tuple[float, ...]:
    """PIL's inverse affine coefficients (output pixel -> input pixel) of the reference op."""
    mag = sign * level / MAX_LEVEL
    if op == OP_IDS["ShearX"]:
        return (1, mag * 0.3, 0, 0, 1, 0)
    if op == OP_IDS["ShearY"]:
        return (1, 0, 0, mag * 0.3, 1, 0)
    if op == OP_IDS["TranslateX"]:
        return (1, 0, mag * 0.045 * w, 0, 1, 0)
    if op == OP_IDS["TranslateY"]:
        return (1, 0, 0, 0, 1, mag * 0.045 * h)
    angle = -math.radians((mag * 30) % 360)      # Image.rotate's matrix: about the centre
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    cx, cy = w / 2.0, h / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


@lru_cache(maxsize=64)
def _warp_grid(op: int, level: float, sign: float, h: int, w: int, device: torch.device) -> torch.Tensor:
    """The ``grid_sample`` grid (1, h, w, 2) of one op's affine map (a handful per run: the level is fixed)."""
    a, b, c, d, e, f = _affine_coeffs(op, level, sign, w, h)
    # the same map in grid_sample's normalised coordinates (align_corners=False: pixel i's centre at i + 0.5)
    theta = torch.tensor([[[a, b * h / w, a + b * h / w + 2 * c / w - 1],
                           [d * w / h, e, d * w / h + e + 2 * f / h - 1]]], dtype=torch.float64)
    return F.affine_grid(theta.float(), [1, 1, h, w], align_corners=False).to(device)


def _warp_(x: torch.Tensor, op: int, levels: list[float], signs: list[float]) -> torch.Tensor:
    """Bilinear affine warp of every frame of each clip, grey fill outside."""
    b, c, t, h, w = x.shape
    grid = torch.cat([_warp_grid(op, lv, sg, h, w, x.device) for lv, sg in zip(levels, signs)])
    flat = x.view(b, c * t, h, w).sub_(_FILL)
    warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.add(warped.view_as(x), _FILL, out=x).round_()   # bilinear stays in range: no clamp


def apply_op_(x: torch.Tensor, kind: int, levels: list[float], signs: list[float]) -> torch.Tensor:
    """One RandAugment op (:data:`OP_IDS`) on clips ``x`` (b, 3, T, H, W), in place; ``levels`` / ``signs``
    one per clip."""
    if kind in _WARP_OPS:
        return _warp_(x, kind, levels, signs)
    if kind in _SHIFT_OPS:
        h, w = x.shape[-2:]
        dim = -1 if kind == OP_IDS["TranslateX"] else -2
        for params in dict.fromkeys(zip(levels, signs)):       # one shift per distinct (level, sign)
            coeffs = _affine_coeffs(kind, *params, w, h)
            offset = coeffs[2] if dim == -1 else coeffs[5]
            rows = [i for i, p in enumerate(zip(levels, signs)) if p == params]
            if len(rows) == len(levels):
                _shift_(x, offset, dim)
            else:
                idx = torch.tensor(rows, device=x.device)
                x.index_copy_(0, idx, _shift_(x.index_select(0, idx), offset, dim))
        return x
    factor = _enhance_factor(levels, x.device)
    if kind == OP_IDS["Contrast"]:
        return _contrast_(x, factor)
    if kind == OP_IDS["Brightness"]:
        return _brightness_(x, factor)
    if kind == OP_IDS["Sharpness"]:
        return _sharpness_(x, factor)
    if kind == OP_IDS["Identity"]:
        return x
    raise ValueError(f"unknown RandAugment op id {kind}")


def normalise_(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """uint8-valued floats -> CLIP-normalised, in place (``norm``: (2, 3) mean, std). Two passes: a
    broadcast ``addcmul`` is 3x slower on a CPU."""
    norm = norm.to(x.device, torch.float32)
    scale = (1.0 / (norm[1] * 255.0)).view(1, 3, 1, 1, 1)
    return x.mul_(scale).sub_((norm[0] / norm[1]).view(1, 3, 1, 1, 1))
