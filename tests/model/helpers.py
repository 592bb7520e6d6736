"""Small builders shared by the model tests."""

from __future__ import annotations

import dataclasses

import torch

from mplug2.config import MPLUG2Config, TextConfig, VisionConfig


def tiny(**overrides) -> MPLUG2Config:
    """The tiny preset with top-level / ``section__field`` overrides, e.g. ``tiny(fusion__stride_layer=100)``."""
    cfg = MPLUG2Config.preset("tiny")
    for k, v in overrides.items():
        if "__" in k:
            sec, f = k.split("__")
            setattr(getattr(cfg, sec), f, v)
        else:
            setattr(cfg, k, v)
    return cfg.validate()


def with_text(cfg: MPLUG2Config, text: TextConfig) -> MPLUG2Config:
    return dataclasses.replace(cfg, text=text).validate()


def with_vision(cfg: MPLUG2Config, vision: VisionConfig) -> MPLUG2Config:
    return dataclasses.replace(cfg, vision=vision).validate()


def padded_batch(vocab: int, lengths: list[int], seed: int = 0, low: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask
