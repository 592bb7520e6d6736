"""Image and video transforms with torch + PIL only (no torchvision on CPU machines).

Train: RandomResizedCrop (bicubic) -> horizontal flip -> temporally consistent RandAugment -> [0,1] ->
CLIP normalisation; a flipped clip's caption (and answer) get *left* and *right* swapped by the batch builder. Eval: bicubic resize to (res, res) -> [0,1] -> normalisation. "Consistent" means one
parameter draw per clip applied to every frame (``model-spec.md`` §6), so motion is not corrupted by
per-frame jitter. Every random choice comes from a ``random.Random`` the caller seeds per sample, which makes
a run reproducible whatever the worker count.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from mplug2.data import defaults

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "TransformConfig", "AugParams", "VideoTransform", "sample_frame_indices",
    "frames_to_tensor", "RANDAUG_OPS",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LEVEL = 10.0


@dataclass(frozen=True)
class TransformConfig:
    res: int = 224
    train: bool = True
    crop_scale: tuple[float, float] = defaults.CROP_SCALE
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaug: bool = True
    randaug_n: int = 2
    randaug_m: int = 5
    randaug_prob: float = 0.5      # each drawn op applies with this probability (ALBEF RandomAugment)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


# ----------------------------------------------------------------------- RandAugment ops (one frame each)

def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                         fillcolor=(128, 128, 128))


def _enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1          # ALBEF enhance_level_to_args


RANDAUG_OPS: dict[str, Callable[[Image.Image, float, float], Image.Image]] = {
    # op(img, level, sign) -> img; sign in {-1, +1} is drawn once per clip like the level.
    "Identity": lambda img, lv, sg: img,
    "Contrast": lambda img, lv, sg: ImageEnhance.Contrast(img).enhance(_enhance_factor(lv)),
    "Brightness": lambda img, lv, sg: ImageEnhance.Brightness(img).enhance(_enhance_factor(lv)),
    "Sharpness": lambda img, lv, sg: ImageEnhance.Sharpness(img).enhance(_enhance_factor(lv)),
    "ShearX": lambda img, lv, sg: _affine(img, (1, sg * lv / MAX_LEVEL * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda img, lv, sg: _affine(img, (1, 0, 0, sg * lv / MAX_LEVEL * 0.3, 1, 0)),
    # 10 px at 224 px and level 10 in ALBEF; kept proportional to the frame size here.
    "TranslateX": lambda img, lv, sg: _affine(img, (1, 0, sg * lv / MAX_LEVEL * 0.045 * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, lv, sg: _affine(img, (1, 0, 0, 0, 1, sg * lv / MAX_LEVEL * 0.045 * img.size[1])),
    "Rotate": lambda img, lv, sg: img.rotate(sg * lv / MAX_LEVEL * 30, resample=Image.Resampling.BILINEAR,
                                             fillcolor=(128, 128, 128)),
}


@dataclass
class AugParams:
    """One clip's random draw; applying it to every frame is what makes the augmentation consistent."""

    crop: tuple[int, int, int, int] | None = None     # left, top, width, height in source pixels
    flip: bool = False
    ops: list[tuple[str, float, float]] = field(default_factory=list)   # (name, level, sign), applied ops only


def _random_resized_crop(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float],
                         rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, on a seeded ``random.Random``."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h                                  # fallback: central crop
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def sample_frame_indices(stored: int, wanted: int, *, train: bool, rng: random.Random) -> list[int]:
    """Pick ``wanted`` of ``stored`` frames: a random frame per segment (train) or segment middles (eval).

    Fewer stored frames than wanted repeat the last index, as the release pads.
    """
    if stored < 1 or wanted < 1:
        raise ValueError(f"need at least one stored and one wanted frame (stored={stored}, wanted={wanted})")
    if stored <= wanted:
        return list(range(stored)) + [stored - 1] * (wanted - stored)
    edges = np.linspace(0, stored, wanted + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        a, b = int(math.ceil(lo)), max(int(math.ceil(hi)) - 1, int(math.ceil(lo)))
        out.append(rng.randint(a, b) if train else (a + b) // 2)
    return out


def frames_to_tensor(frames: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL frames of one size -> normalised float tensor (3, T, H, W)."""
    arr = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])          # (T, H, W, 3)
    x = torch.from_numpy(arr).permute(3, 0, 1, 2).float().div_(255.0)         # (3, T, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    return x.sub_(m).div_(s)


class VideoTransform:
    """Frames (an image is a one-frame clip) -> (3, T, res, res) float, CLIP-normalised.

    The PIL reference implementation, one frame at a time; :class:`mplug2.data.augment.TensorTransform` is
    the fast path the loader uses by default and is checked against this one."""

    lazy_decode = False      # frames arrive fully decoded (TensorTransform decodes them itself, at size)

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def draw(self, width: int, height: int, rng: random.Random) -> AugParams:
        """Draw one clip's parameters (train only)."""
        c = self.cfg
        p = AugParams(crop=_random_resized_crop(width, height, c.crop_scale, c.crop_ratio, rng))
        p.flip = c.hflip and rng.random() < 0.5
        if c.randaug:
            names = list(RANDAUG_OPS)
            for name in [rng.choice(names) for _ in range(c.randaug_n)]:
                sign = 1.0 if rng.random() < 0.5 else -1.0
                if rng.random() < c.randaug_prob:
                    p.ops.append((name, float(c.randaug_m), sign))
        return p

    def apply(self, frame: Image.Image, p: AugParams) -> Image.Image:
        res = (self.cfg.res, self.cfg.res)
        if p.crop is None:
            return frame.resize(res, Image.Resampling.BICUBIC)
        left, top, w, h = p.crop
        frame = frame.resize(res, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if p.flip:
            frame = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name, level, sign in p.ops:
            frame = RANDAUG_OPS[name](frame, level, sign)
        return frame

    def __call__(self, frames: Sequence[Image.Image], rng: random.Random | None = None) -> torch.Tensor:
        return self.with_params(frames, rng)[0]

    def with_params(self, frames: Sequence[Image.Image],
                    rng: random.Random | None = None) -> tuple[torch.Tensor, AugParams]:
        """The transformed clip and the parameters drawn for it (the caller mirrors the text on a flip)."""
        frames = [f if f.mode == "RGB" else f.convert("RGB") for f in frames]
        params = self.draw_for(frames, rng)
        out = [self.apply(f, params) for f in frames]
        return frames_to_tensor(out, self.cfg.mean, self.cfg.std), params

    def draw_for(self, frames: Sequence[Image.Image], rng: random.Random | None) -> AugParams:
        """Check a clip (frames of one size) and draw its parameters (train) or none (eval)."""
        if not frames:
            raise ValueError("a sample needs at least one frame")
        w, h = frames[0].size
        if any(f.size != (w, h) for f in frames):
            raise ValueError(f"frames of one clip differ in size: {sorted({f.size for f in frames})}")
        if not self.cfg.train:
            return AugParams()
        if rng is None:
            raise ValueError("train transforms need a seeded rng (reproducibility)")
        return self.draw(w, h, rng)

    def collate(self, clips: list[torch.Tensor], params: list[AugParams]) -> dict[str, torch.Tensor]:
        """The batch's pixel fields from its transformed clips."""
        return {"pixels": torch.stack(clips)}
