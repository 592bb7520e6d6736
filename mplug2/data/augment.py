"""The fast training transform: JPEG decoded at the size needed, crop + resize on uint8 tensors, flip and
RandAugment on whole batches (in the loader worker, or on the training device with ``augment_on: device``).

Same augmentation as :class:`~mplug2.data.transforms.VideoTransform` (the PIL reference, ``model-spec.md``
§6): the clip's parameters come from the very same ``draw`` on the same seeded RNG, so crop boxes, flips and
op choices are identical draw for draw; only the pixel arithmetic differs (torch's antialiased bicubic, which
follows PIL's, and bilinear ``grid_sample`` for the affine ops). What makes it cheaper:

- frames decoded by :class:`mplug2.data.decode.ClipDecoder`: libjpeg-turbo straight into one reused buffer,
  at a DCT scale of 1/2, 1/4 or 1/8 when the crop still has ``res`` pixels per side after it;
- one ``interpolate`` per clip (all frames at once, uint8, channels-last) instead of one PIL resize per frame;
- the batch written once, into shared memory in a worker (no copy on the way to the trainer); RandAugment only
  on the samples whose draw applies an op, then one normalisation.

With ``augment_on: device`` the worker stops after the crop + resize and ships uint8 pixels plus the drawn
parameters (``aug_ops``, ``pixel_norm``); :func:`finish_batch` applies them where the batch
lands. The flip is done in the worker either way, next to the caption swap (``text.swap_left_right``), so
text and pixels always agree.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from mplug2.data.decode import ClipDecoder, EncodedFrame
from mplug2.data.defaults import AUGMENT_ON_CHOICES
from mplug2.data.transforms import MAX_LEVEL, RANDAUG_OPS, AugParams, TransformConfig, VideoTransform

__all__ = ["OP_IDS", "TensorTransform", "augment_clips", "augment_batch", "finish_batch",
           "encode_ops", "batch_tensor"]

OP_IDS = {name: i for i, name in enumerate(RANDAUG_OPS)}
_AFFINE_OPS = frozenset(OP_IDS[n] for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))
_FILL = 128.0                                     # PIL fillcolor of the reference ops


def encode_ops(params: AugParams, slots: int) -> torch.Tensor:
    """The applied ops of one clip as ``(slots, 3)`` rows ``(op id, level, sign)``, padded with Identity."""
    rows = [(float(OP_IDS[name]), level, sign) for name, level, sign in params.ops]
    rows += [(float(OP_IDS["Identity"]), 0.0, 1.0)] * (slots - len(rows))
    return torch.tensor(rows[:slots], dtype=torch.float32).reshape(slots, 3)


class TensorTransform(VideoTransform):
    """Frames (lazily opened PIL images) -> uint8 ``(3, T, res, res)`` cropped and resized; :meth:`collate`
    finishes a batch (flip, RandAugment, normalisation) here or leaves it to :func:`finish_batch`."""

    lazy_decode = True

    def __init__(self, cfg: TransformConfig, *, augment_on: str = "cpu") -> None:
        if augment_on not in AUGMENT_ON_CHOICES:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON_CHOICES}, got {augment_on!r}")
        super().__init__(cfg)
        self.augment_on = augment_on
        self._decoder = ClipDecoder()

    def with_params(self, frames: Sequence[EncodedFrame],
                    rng: random.Random | None = None) -> tuple[torch.Tensor, AugParams]:
        """Frames opened by :func:`mplug2.data.decode.open_frame` -> uint8 ``(3, T, res, res)`` (a view with
        channels-last strides; :meth:`collate` copies it into the batch) and the clip's draw."""
        params = self.draw_for(frames, rng)
        box = params.crop or (0, 0, *frames[0].size)
        res = self.cfg.res
        crops = self._decoder.decode(frames, box, res)                        # (T, 3, h, w) uint8 view
        if crops.shape[-2:] != (res, res):     # all frames at once; the output is channels-last like the input
            clip = F.interpolate(crops, size=(res, res), mode="bicubic", antialias=True, align_corners=False)
        else:
            clip = crops.clone(memory_format=torch.channels_last)             # the decoder reuses its buffer
        if params.flip:                        # after the resize, as the reference flips
            clip = clip.flip(-1)
        return clip.permute(1, 0, 2, 3), params

    def collate(self, clips: list[torch.Tensor], params: list[AugParams]) -> dict[str, Any]:
        norm = torch.tensor([self.cfg.mean, self.cfg.std], dtype=torch.float32)
        shape = (len(clips), *clips[0].shape)
        if self.cfg.train and self.augment_on == "device":
            ops = torch.stack([encode_ops(p, self.cfg.randaug_n) for p in params])
            pixels = torch.stack(clips, out=batch_tensor(shape, torch.uint8))
            return {"pixels": pixels, "aug_ops": ops, "pixel_norm": norm}
        return {"pixels": augment_clips(clips, params, norm, out=batch_tensor(shape, torch.float32))}


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch; inside a DataLoader worker it is allocated in shared memory, so handing
    it to the trainer process costs no copy (what torch's ``default_collate`` does for its stacks)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


# ------------------------------------------------------------------------------------- batched pixel ops
# Every op works in place on uint8-valued floats and rounds back to uint8 values, as PIL does after each op:
# a fresh tensor per op would cost more than the op itself on a CPU (page faults on every new buffer).

def _blend_(x: torch.Tensor, degenerate: torch.Tensor | float, factor: torch.Tensor | float) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``, in place (``factor``: a float, or one per clip)."""
    f = factor if isinstance(factor, float) else factor.view(-1, *([1] * (x.dim() - 1)))
    return x.sub_(degenerate).mul_(f).add_(degenerate).round_().clamp_(0, 255)


def _contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # ImageEnhance.Contrast: blend with the frame's mean grey (PIL "L" conversion, rounded mean)
    lum = (x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114).round_()        # (b, T, H, W)
    mean = torch.floor(lum.mean(dim=(-2, -1)) + 0.5)[:, None, :, None, None]   # (b, 1, T, 1, 1)
    return _blend_(x, mean, factor)


def _sharpness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, others 1, /13); PIL leaves the
    # one-pixel border unfiltered, where the blend is then the identity
    # 3x3 sum as two shifted 1-D sums (avg_pool2d's CPU kernel is ~10x slower for this shape)
    rows = x[..., :-2] + x[..., 1:-1]
    rows.add_(x[..., 2:])
    box = rows[..., :-2, :] + rows[..., 1:-1, :]
    box.add_(rows[..., 2:, :])
    inner = x[..., 1:-1, 1:-1]
    smooth = box.add_(inner, alpha=4.0).div_(13.0).round_()
    _blend_(inner, smooth, factor)
    return x


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


def _affine_(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp of every frame of each clip (``coeffs``: (b, 6) in pixels), grey fill outside."""
    b, c, t, h, w = x.shape
    a, bb, cc, d, e, f = coeffs.to(torch.float64).unbind(1)
    # the same map in grid_sample's normalised coordinates (align_corners=False: pixel i's centre at i + 0.5)
    theta = torch.stack([torch.stack([a, bb * h / w, a + bb * h / w + 2 * cc / w - 1], 1),
                         torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, torch.float32), [b, c * t, h, w], align_corners=False)
    flat = x.view(b, c * t, h, w).sub_(_FILL)
    warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.copy_(warped.view_as(x)).add_(_FILL).round_().clamp_(0, 255)


def _apply_op_(x: torch.Tensor, kind: int, levels: list[float], signs: list[float]) -> torch.Tensor:
    """One RandAugment op on clips ``x`` (b, 3, T, H, W), in place; ``levels`` / ``signs`` one per clip."""
    if kind in _AFFINE_OPS:
        h, w = x.shape[-2:]
        coeffs = torch.tensor([_affine_coeffs(kind, lv, sg, w, h) for lv, sg in zip(levels, signs)],
                              dtype=torch.float32)
        return _affine_(x, coeffs)
    factors = [lv / MAX_LEVEL * 1.8 + 0.1 for lv in levels]                  # ALBEF enhance_level_to_args
    factor = factors[0] if len(factors) == 1 else torch.tensor(factors, device=x.device)
    if kind == OP_IDS["Contrast"]:
        return _contrast_(x, factor)
    if kind == OP_IDS["Brightness"]:
        return _blend_(x, 0.0, factor)
    if kind == OP_IDS["Sharpness"]:
        return _sharpness_(x, factor)
    raise ValueError(f"unknown RandAugment op id {kind}")


def _normalise_(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    norm = norm.to(x.device, torch.float32)
    scale = (1.0 / (norm[1] * 255.0)).view(1, 3, 1, 1, 1)
    return x.mul_(scale).sub_((norm[0] / norm[1]).view(1, 3, 1, 1, 1))


def augment_clips(clips: list[torch.Tensor], params: list[AugParams], norm: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU path: uint8 clips (3, T, H, W) -> one float batch (into ``out`` if given), each clip augmented
    and normalised while its float copy is in cache (measured 2-3x faster than whole-batch passes on a CPU)."""
    if out is None:
        out = torch.empty((len(clips), *clips[0].shape), dtype=torch.float32)
    for i, (clip, p) in enumerate(zip(clips, params)):
        x = out[i:i + 1]
        x.copy_(clip[None])
        for name, level, sign in p.ops:
            if name != "Identity":
                _apply_op_(x, OP_IDS[name], [level], [sign])
        _normalise_(x, norm)
    return out


def augment_batch(pixels: torch.Tensor, ops: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The device path: uint8 ``(B, 3, T, H, W)`` (already cropped and flipped) -> RandAugmented, normalised
    float32, on ``pixels``' device, each op on all the clips it applies to at once.

    ``ops`` (B, N, 3) rows ``(op id, level, sign)`` applied slot by slot in order, ``norm`` (2, 3) mean and
    std. Only the samples an op applies to are computed.
    """
    x = pixels.float()
    ops_host = ops.detach().cpu()
    for slot in range(ops_host.shape[1]):
        kinds = ops_host[:, slot, 0].long()
        for kind in kinds.unique().tolist():
            if kind == OP_IDS["Identity"]:
                continue
            rows = (kinds == kind).nonzero().squeeze(1)
            levels, signs = ops_host[rows, slot, 1].tolist(), ops_host[rows, slot, 2].tolist()
            if len(rows) == len(kinds):
                _apply_op_(x, kind, levels, signs)
            else:
                idx = rows.to(x.device)
                x.index_copy_(0, idx, _apply_op_(x.index_select(0, idx), kind, levels, signs))
    return _normalise_(x, norm)


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Apply the augmentation a loader left to the device (``augment_on: device``); other batches pass.

    Call after the batch is on the training device: the work then runs there, the CPU only decoded."""
    if "aug_ops" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in ("aug_ops", "pixel_norm")}
    out["pixels"] = augment_batch(batch["pixels"], batch["aug_ops"], batch["pixel_norm"])
    return out
