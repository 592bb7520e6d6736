"""Held-out corpora for evaluation: decoded once per process with the eval transform, in manifest order.

A rank may load only its slice (``rank``/``world_size``: items ``rank, rank + world, ...``), so memory per rank
falls with the number of ranks; :mod:`mplug2.train.tasks` gathers what each task needs across ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mplug2.data.boxes import normalised_xyxy, transform_with_box
from mplug2.data.collate import decode_sample
from mplug2.data.dataset_index import load_index
from mplug2.data.stream import iter_shard_samples
from mplug2.data.text import pre_caption
from mplug2.data.transforms import TransformConfig, VideoTransform

__all__ = ["EvalSet", "load_eval_set", "cached_eval_set"]


@dataclass
class EvalSet:
    """A held-out corpus (or one rank's slice of it), decoded with the eval transform."""

    keys: list[str]
    pixels: torch.Tensor            # (N, 3, T, H, W)
    captions: list[list[str]]       # every reference per item, cleaned (the question, for QA)
    answers: list[str | None]
    labels: list[str | int | None] | None = None
    answer_lists: list[list[str] | None] | None = None  # VQA: the human answers (10 in VQA v2) per question
    positions: list[int] | None = None                  # manifest positions of the items (a rank's slice)
    total: int | None = None                            # items in the whole corpus (all slices)
    boxes: list[tuple[float, ...] | None] | None = None  # grounding: normalised (x1, y1, x2, y2), as in batches

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = list(range(len(self.keys)))
        if self.total is None:
            self.total = len(self.keys)

    def shard(self, rank: int, world_size: int) -> "EvalSet":
        """This rank's slice (items ``rank, rank + world_size, ...``), as :func:`load_eval_set` reads it."""
        take = [i for i, p in enumerate(self.positions) if p % world_size == rank]

        def pick(xs):
            return None if xs is None else [xs[i] for i in take]
        return EvalSet(pick(self.keys), self.pixels[take], pick(self.captions), pick(self.answers),
                       pick(self.labels), pick(self.answer_lists),
                       [self.positions[i] for i in take], self.total, pick(self.boxes))


def _samples(index) -> Iterator[dict[str, Any]]:
    for shard in index.shards:
        yield from iter_shard_samples(shard)


def load_eval_set(path: str, split: str, num_frames: int, res: int, *, max_items: int | None = None,
                  label_key: str = "label", rank: int = 0, world_size: int = 1) -> EvalSet:
    """Decode items ``rank, rank + world_size, ...`` of the corpus at ``path`` (every item when world_size=1)."""
    index = load_index(path, split)
    transform = VideoTransform(TransformConfig(res=res, train=False))
    keys, pixels, caps, answers, labels, answer_lists, positions, boxes = [], [], [], [], [], [], [], []
    total = 0
    for pos, raw in enumerate(_samples(index)):
        if max_items and pos >= max_items:
            break
        total += 1
        if pos % world_size != rank:
            continue
        dec = decode_sample(raw, num_frames=num_frames, train=False, rng=random.Random(0), label_key=label_key)
        keys.append(dec.key)
        if dec.box is None:
            pixels.append(transform(dec.frames, random.Random(0)))
            boxes.append(None)
        else:
            clip, _, box = transform_with_box(transform, dec.frames, dec.box, random.Random(0))
            pixels.append(clip)
            boxes.append(normalised_xyxy(box, res, res))
        caps.append([pre_caption(c) for c in dec.captions])
        answers.append(dec.answer)
        labels.append(dec.label)
        answer_lists.append(dec.answer_list)
        positions.append(pos)
    if total == 0:
        raise ValueError(f"eval corpus {path} has no samples")
    if not keys:
        raise ValueError(f"eval corpus {path} has {total} samples: fewer than the {world_size} ranks")
    return EvalSet(keys, torch.stack(pixels), caps, answers, labels, answer_lists, positions, total, boxes)


_CACHE: dict[tuple, EvalSet] = {}


def cached_eval_set(path: str, split: str, num_frames: int, res: int, *, label_key: str = "label",
                    rank: int = 0, world_size: int = 1) -> EvalSet:
    """:func:`load_eval_set`, once per process (the loop evaluates the same corpus many times)."""
    key = (path, split, num_frames, res, label_key, rank, world_size)
    if key not in _CACHE:
        _CACHE[key] = load_eval_set(path, split, num_frames, res, label_key=label_key, rank=rank,
                                    world_size=world_size)
    return _CACHE[key]
