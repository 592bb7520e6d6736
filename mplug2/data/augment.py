"""The fast training transform: JPEG decoded at the size needed, crop + resize on uint8 tensors, flip and
RandAugment on whole batches (in the loader worker, or on the training device with ``augment_on: device``).

Same augmentation as :class:`~mplug2.data.transforms.VideoTransform` (the PIL reference, ``model-spec.md``
§6): the clip's parameters come from the very same ``draw`` on the same seeded RNG, so crop boxes, flips and
op choices are identical draw for draw; only the pixel arithmetic differs (torch's antialiased bicubic, which
follows PIL's, and bilinear sampling for the affine ops, :mod:`mplug2.data.pixel_ops`). What makes it cheaper:

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
from mplug2.data.pixel_ops import OP_IDS, apply_op_, normalise_
from mplug2.data.transforms import AugParams, TransformConfig, VideoTransform

__all__ = ["OP_IDS", "TensorTransform", "augment_clips", "augment_batch", "finish_batch",
           "encode_ops", "batch_tensor"]


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
                apply_op_(x, OP_IDS[name], [level], [sign])
        normalise_(x, norm)
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
                apply_op_(x, kind, levels, signs)
            else:
                idx = rows.to(x.device)
                x.index_copy_(0, idx, apply_op_(x.index_select(0, idx), kind, levels, signs))
    return normalise_(x, norm)


def finish_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Apply the augmentation a loader left to the device (``augment_on: device``); other batches pass.

    Call after the batch is on the training device: the work then runs there, the CPU only decoded."""
    if "aug_ops" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in ("aug_ops", "pixel_norm")}
    out["pixels"] = augment_batch(batch["pixels"], batch["aug_ops"], batch["pixel_norm"])
    return out
