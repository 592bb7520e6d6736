"""Synthetic video-text and image-text corpora whose captions describe what is visible.

Used by the demo, the training tests and benchmarks: a coloured shape moves in one direction over a
textured background, and the caption names its size, colour, shape, direction and speed ("a small red
circle moving left slowly"). A model that learns the corpus must read colour, shape and size from pixels and
direction and speed from the temporal order of frames, so retrieval above chance is evidence of real
learning, not of caption lookup. Captions repeat rarely (288 combinations); a held-out set of 72 clips
(:func:`clip_specs` with ``distinct=True``) gives each clip its own colour-shape-direction, so its captions
are unique and chance R@1 is 1/72.

    python -m pipelines.synthetic --out corpus/ --videos 200 --images 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 70, 230),
    "yellow": (235, 220, 40), "purple": (150, 40, 190), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.14), "big": (0.2, 0.24)}     # radius / frame side
SPEEDS: dict[str, float] = {"slowly": 0.25, "quickly": 0.6}                            # travel / frame side
# Size and speed are fractions of the frame, so a training crop that magnifies changes them, as a flip changes
# left / right: ALBEF's default area range (0.5, 1) magnifies up to 1.41x, which puts a small shape (radius up to
# 0.14) at a big one's size (from 0.2) and carries a quick one (travel 0.6) out of the crop. (0.8, 1) magnifies at
# most 1.12x. Measured on the learning test's retrieval fine-tune (docs/benchmarks.md, issue 14, stop 15): median
# text->video R@1 43 -> 50 %, worst seed 22 -> 40 % (with no RandAugment and a quarter of ITM negatives uniform).
TRAIN_CROP_SCALE = (0.8, 1.0)


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    seed: int
    size: str = "big"
    speed: str = "quickly"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction} {self.speed}"

    @property
    def still_caption(self) -> str:
        """The caption of one frame (no motion)."""
        return f"a {self.size} {self.colour} {self.shape}"


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # upward-pointing triangle
    top, bottom = cy - r, cy + r
    half = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render_frames(spec: ClipSpec, *, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of the clip; deterministic in ``spec``."""
    rng = np.random.default_rng(spec.seed)
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    dx, dy = DIRECTIONS[spec.direction]
    r = size * rng.uniform(*SIZES[spec.size])
    travel = size * SPEEDS[spec.speed]
    cx0 = size / 2 - dx * travel / 2 + rng.uniform(-3, 3)
    cy0 = size / 2 - dy * travel / 2 + rng.uniform(-3, 3)
    colour = np.array(COLOURS[spec.colour], dtype=np.uint8)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        f = t / max(1, num_frames - 1)
        frame = background.copy()
        frame[_shape_mask(spec.shape, size, cx0 + dx * travel * f, cy0 + dy * travel * f, r)] = colour
        frames[t] = frame
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """Encode frames as H.264 mp4 with PyAV, byte for byte the same on every run. x264's macroblock-tree rate
    control (``mbtree``, on by default) gave other bytes, and other decoded pixels (up to 9 levels), for the same
    frames now and then, depending on what the process had encoded before, threads or not; the corpora, and the
    learning figures and the demo's table trained on them, then differed between runs (docs/benchmarks.md,
    stop 25). Without it 300 encodes of one clip gave one file."""
    import av

    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18", "g": str(fps), "x264-params": "mbtree=0"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_jpeg(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(frame).save(path, format="JPEG", quality=95)


def clip_specs(n: int, seed: int, *, distinct: bool = False) -> list[ClipSpec]:
    """``n`` specs cycling through every (size, colour, shape, direction, speed) combination in a seeded order
    (288), or with ``distinct`` through every (colour, shape, direction) (72), size and speed drawn per clip:
    up to 72 clips that differ in what is most visible, each with its own caption (a held-out set)."""
    rng = random.Random(seed)
    if distinct:
        combos = [(z, c, s, d, v) for c in COLOURS for s in SHAPES for d in DIRECTIONS
                  for z, v in [(rng.choice(list(SIZES)), rng.choice(list(SPEEDS)))]]
    else:
        combos = [(z, c, s, d, v) for z in SIZES for c in COLOURS for s in SHAPES for d in DIRECTIONS for v in SPEEDS]
    rng.shuffle(combos)
    out = []
    for i in range(n):
        z, c, s, d, v = combos[i % len(combos)]
        sub = int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:4], "little")
        out.append(ClipSpec(c, s, d, sub, size=z, speed=v))
    return out


def make_video_corpus(out: Path, n: int, *, seed: int = 0, num_frames: int = 16, size: int = 64,
                      fps: int = 8, split: str = "train", distinct: bool = False) -> Path:
    """Write ``n`` mp4 clips and a jsonl manifest (``path``, ``caption``, ``colour``, ``shape``, ``direction``,
    ``size``, ``speed``); ``distinct``: see :func:`clip_specs` (held-out sets)."""
    media = out / "videos"
    media.mkdir(parents=True, exist_ok=True)
    manifest = out / f"videos_{split}.jsonl"
    with open(manifest, "w") as f:
        for i, spec in enumerate(clip_specs(n, seed, distinct=distinct)):
            path = media / f"{split}_{i:05d}.mp4"
            if not path.exists():
                write_mp4(path, render_frames(spec, num_frames=num_frames, size=size), fps=fps)
            row = {"path": str(path.resolve()), "caption": spec.caption, "colour": spec.colour,
                   "shape": spec.shape, "direction": spec.direction, "size": spec.size, "speed": spec.speed}
            f.write(json.dumps(row) + "\n")
    log.info("wrote %d synthetic clips and %s", n, manifest)
    return manifest


# Where a still's shape sits (centre as a fraction of the side). A still has no direction or speed, so its caption
# names its corner: without it 36 captions (size, colour, shape) would repeat every few images, and a batch's
# repeats are false negatives for contrastive learning. "left"/"right" follow a flip (text.swap_left_right).
CORNERS: dict[str, tuple[float, float]] = {"top left": (0.3, 0.3), "top right": (0.7, 0.3),
                                           "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}


def render_still(spec: ClipSpec, corner: str, *, size: int = 64) -> np.ndarray:
    """(H, W, 3) uint8: the clip's shape, still, centred in ``corner`` (jittered by 1/32 of the side)."""
    rng = np.random.default_rng(spec.seed)
    frame = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    r = size * rng.uniform(*SIZES[spec.size])
    fx, fy = CORNERS[corner]
    cx, cy = (size * (f + rng.uniform(-1, 1) / 32) for f in (fx, fy))
    frame[_shape_mask(spec.shape, size, cx, cy, r)] = np.array(COLOURS[spec.colour], dtype=np.uint8)
    return frame


def make_image_corpus(out: Path, n: int, *, seed: int = 1, size: int = 64, split: str = "train",
                      distinct: bool = False) -> Path:
    """Write ``n`` JPEG images of one still shape and a jsonl manifest; the caption names what is visible: size,
    colour, shape and corner ("a small red circle in the top left", 144 combinations, cycled in a seeded order,
    so captions rarely repeat). ``distinct``: at most 144 images, each with its own caption (a held-out set)."""
    if distinct and n > 144:
        raise ValueError(f"a distinct image set has at most 144 images (one per caption), asked for {n}")
    media = out / "images"
    media.mkdir(parents=True, exist_ok=True)
    manifest = out / f"images_{split}.jsonl"
    rng = random.Random(seed)
    combos = [(z, c, sh, k) for z in SIZES for c in COLOURS for sh in SHAPES for k in CORNERS]
    rng.shuffle(combos)
    with open(manifest, "w") as f:
        for i, spec in enumerate(clip_specs(n, seed)):
            z, c, sh, corner = combos[i % len(combos)]
            spec = ClipSpec(c, sh, "up", spec.seed, size=z)
            path = media / f"{split}_{i:05d}.jpg"
            if not path.exists():
                write_jpeg(path, render_still(spec, corner, size=size))
            row = {"url": str(path.resolve()), "caption": f"{spec.still_caption} in the {corner}",
                   "colour": spec.colour, "shape": spec.shape, "size": spec.size, "corner": corner}
            f.write(json.dumps(row) + "\n")
    log.info("wrote %d synthetic images and %s", n, manifest)
    return manifest


def _place_two(rng: np.random.Generator, size: int) -> tuple[list[tuple[float, float]], tuple[int, int]]:
    """Centres for two shapes in two different quadrants (0 1 / 2 3) of the frame, jittered by 1/32 of its
    side, so they never touch; and the two quadrants."""
    q1, q2 = (int(q) for q in rng.choice(4, size=2, replace=False))
    return [(size * (0.25 + 0.5 * (q % 2)) + rng.uniform(-1, 1) * size / 32,
             size * (0.25 + 0.5 * (q // 2)) + rng.uniform(-1, 1) * size / 32) for q in (q1, q2)], (q1, q2)


def _relation(target_q: int, other_q: int, rng: random.Random) -> str:
    """Where the target is relative to the other shape, in words ("on the left", "at the top")."""
    options = []
    if target_q % 2 != other_q % 2:
        options.append("on the left" if target_q % 2 == 0 else "on the right")
    if target_q // 2 != other_q // 2:
        options.append("at the top" if target_q // 2 == 0 else "at the bottom")
    return rng.choice(options)


def render_grounding(target: ClipSpec, distractor: ClipSpec, seed: int, size: int = 64
                     ) -> tuple[np.ndarray, list[int], tuple[int, int]]:
    """One image with two shapes, the target's tight box ``[x, y, w, h]`` in pixels (COCO convention) and the
    quadrants of the target and the distractor."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    radii = [size * rng.uniform(*SIZES[s.size]) for s in (target, distractor)]
    centres, quadrants = _place_two(rng, size)
    box: list[int] = []
    for spec, r, (cx, cy) in zip((target, distractor), radii, centres):
        mask = _shape_mask(spec.shape, size, cx, cy, r)
        frame[mask] = np.array(COLOURS[spec.colour], dtype=np.uint8)
        if not box:
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return frame, box, quadrants


def make_grounding_corpus(out: Path, n: int, *, seed: int = 3, size: int = 64, split: str = "train") -> Path:
    """Visual grounding: ``n`` images with two shapes of different colours (half of them also differ in shape
    or size), each in its own quadrant; the ``expression`` column names one and says where it is next to the
    other ("the small red circle on the left": a flip swaps the word and mirrors the box) and ``bbox`` holds its box (COCO
    ``[x, y, w, h]`` in source pixels), so a model must read the expression to know which shape to box. The
    manifest is RefCOCO-style (``--preset refcoco``)."""
    media = out / "grounding"
    media.mkdir(parents=True, exist_ok=True)
    manifest = out / f"grounding_{split}.jsonl"
    rng = random.Random(seed)
    colours = list(COLOURS)
    with open(manifest, "w") as f:
        for i in range(n):
            c1, c2 = rng.sample(colours, 2)
            t = ClipSpec(c1, rng.choice(SHAPES), "up", 0, size=rng.choice(list(SIZES)))
            d = ClipSpec(c2, t.shape, "up", 0, size=t.size)
            if rng.random() < 0.5:
                d = ClipSpec(c2, rng.choice([s for s in SHAPES if s != t.shape]), "up", 0,
                             size=rng.choice(list(SIZES)))
            sub = int.from_bytes(hashlib.sha256(f"ground:{seed}:{i}".encode()).digest()[:4], "little")
            frame, box, (qt, qd) = render_grounding(t, d, sub, size)
            path = media / f"{split}_{i:05d}.jpg"
            write_jpeg(path, frame)
            expression = f"the {t.still_caption[2:]} {_relation(qt, qd, rng)}"
            f.write(json.dumps({"image": str(path.resolve()), "expression": expression,
                                "bbox": box, "distractor": d.still_caption[2:]}) + "\n")
    log.info("wrote %d synthetic grounding images and %s", n, manifest)
    return manifest


QUESTIONS = {
    "colour": "what colour is the shape",
    "shape": "what shape is it",
    "direction": "which way does the shape move",
    "size": "how big is the shape",
    "speed": "how fast does the shape move",
}


def make_qa_corpus(out: Path, n: int, *, seed: int = 2, num_frames: int = 16, size: int = 64,
                   split: str = "train", distinct: bool = False) -> Path:
    """Video QA: ``n`` clips, one question each about colour, shape or motion; the caption column holds the
    question and the ``answer`` column (kept in each sample's json) the one-word answer."""
    media = out / "qa_videos"
    media.mkdir(parents=True, exist_ok=True)
    manifest = out / f"qa_{split}.jsonl"
    rng = random.Random(seed)
    with open(manifest, "w") as f:
        for i, spec in enumerate(clip_specs(n, seed, distinct=distinct)):
            path = media / f"{split}_{i:05d}.mp4"
            if not path.exists():
                write_mp4(path, render_frames(spec, num_frames=num_frames, size=size))
            kind = rng.choice(sorted(QUESTIONS))
            answer = getattr(spec, kind)
            f.write(json.dumps({"path": str(path.resolve()), "caption": QUESTIONS[kind], "answer": answer,
                                "question_type": kind}) + "\n")
    log.info("wrote %d synthetic QA clips and %s", n, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--videos", type=int, default=200, help="number of video clips")
    p.add_argument("--images", type=int, default=0, help="number of images")
    p.add_argument("--qa", type=int, default=0, help="number of video QA clips (one question each)")
    p.add_argument("--grounding", type=int, default=0, help="number of grounding images (two shapes, one named)")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.videos:
        make_video_corpus(args.out, args.videos, seed=args.seed, num_frames=args.frames, size=args.size,
                          split=args.split)
    if args.images:
        make_image_corpus(args.out, args.images, seed=args.seed + 1, size=args.size, split=args.split)
    if args.qa:
        make_qa_corpus(args.out, args.qa, seed=args.seed + 2, num_frames=args.frames, size=args.size,
                       split=args.split)
    if args.grounding:
        make_grounding_corpus(args.out, args.grounding, seed=args.seed + 3, size=args.size, split=args.split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
