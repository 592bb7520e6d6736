"""Typed configuration of the mPLUG-2 model, with the tiny / base / large presets of model-spec section 2.

Configs are plain dataclasses so that a run's YAML, a checkpoint folder and a test can all build the exact same
model. ``validate()`` rejects shapes that would build but silently compute something else (for example
``num_uni_layer != 2``, which breaks the universal layers' role swap, model-spec 3.3).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mplug2.typed_config import float_fields, float_from_text

IMAGE_MODES = ("skip", "centre", "repeat")


@dataclass
class VisionConfig:
    """Dual-vision encoder (CLIP ViT + local temporal modules), model-spec 3.1."""

    width: int
    layers: int
    heads: int
    patch_size: int
    image_res: int
    mlp_ratio: int = 4
    lt_bottleneck_ratio: float = 0.5
    ln_eps: float = 1e-5
    temporal_downsampling: bool = False
    drop_path: float = 0.0
    image_mode: str = "skip"  # skip | centre | repeat (how a T=1 input is treated)

    @property
    def grid(self) -> int:
        return self.image_res // self.patch_size

    @property
    def lt_bottleneck(self) -> int:
        return max(1, int(self.width * self.lt_bottleneck_ratio))


@dataclass
class TextConfig:
    """BERT text encoder; its last ``num_uni_layer`` (= 2) layers are the universal layers (model-spec 3.2, 3.3)."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    num_uni_layer: int = 2
    num_latents: int = 50
    pad_token_id: int = 0
    # std of the normal init of text / fusion / decoder weights created from scratch. BERT's 0.02 suits width
    # 768; a residual branch's output scales with std·√width, so at width 32 it leaves every layer an identity:
    # the [CLS] state hardly depends on the caption or, after fusion, on the video, and ITM cannot learn.
    # Tiny runs trained from scratch (configs/pretrain_tiny.yaml, the demo) set 1/sqrt(32) = 0.18.
    init_std: float = 0.02


@dataclass
class FusionConfig:
    """Fusion encoder: ``layers`` co-attention layers; layer j != 0 with j % stride_layer == 0 is connected."""

    layers: int
    stride_layer: int

    def is_connected(self, j: int) -> bool:
        """Layer j runs connected attention (no cross-attention of its own)."""
        return j != 0 and j % self.stride_layer == 0


@dataclass
class DecoderConfig:
    """Shared causal decoder (same width/heads as the text encoder). BOS = [CLS], EOS = [SEP] of the tokenizer."""

    layers: int
    bos_token_id: int = 101
    eos_token_id: int = 102


@dataclass
class MPLUG2Config:
    vision: VisionConfig
    text: TextConfig
    fusion: FusionConfig
    decoder: DecoderConfig
    embed_dim: int = 256
    queue_size: int = 65536
    temp: float = 0.07
    momentum: float = 0.995
    alpha: float = 0.4
    mlm_probability: float = 0.15
    itm_random_negatives: float = 0.0   # share of ITM negatives drawn uniformly, not by ITC similarity (itm.py)
    itm_reversed_negatives: float = 0.0  # share of a batch's clips ITM also sees played backwards, as non-matches
                                         # of their own caption (itm.py: only for captions that state a direction)
    num_frames: int = 16
    max_text_len: int = 30
    max_answer_len: int = 10
    beam: int = 5
    gen_max_len: int = 20
    gen_min_len: int = 1
    activation_checkpointing: bool = False
    token_compression: bool = False
    # Added fields (not in the frozen API list, safe defaults): which vocabulary the preset expects.
    tokenizer: str = "bert-base-uncased"  # "bert-base-uncased" (MiniLM-shipped vocab) | "tiny" | a vocab folder

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "MPLUG2Config":
        """Return a fresh copy of the named preset (``tiny`` | ``base`` | ``large``)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        cfg = copy.deepcopy(_PRESETS[name])
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MPLUG2Config":
        """Build from a nested dict; a ``preset`` key, if present, supplies defaults that the rest overrides."""
        d = copy.deepcopy(dict(d))
        base = cls.preset(d.pop("preset")).to_dict() if "preset" in d else None
        if base is not None:
            for k, v in d.items():
                if isinstance(v, dict) and isinstance(base.get(k), dict):
                    base[k].update(v)
                else:
                    base[k] = v
            d = base
        subs = {"vision": VisionConfig, "text": TextConfig, "fusion": FusionConfig, "decoder": DecoderConfig}
        kwargs: dict[str, Any] = {}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - top
        if unknown:
            raise ValueError(f"unknown MPLUG2Config keys: {sorted(unknown)}")
        for k, v in d.items():
            if k in subs:
                if not isinstance(v, dict):
                    raise ValueError(f"config section {k!r} must be a mapping, got {type(v).__name__}")
                names = {f.name for f in dataclasses.fields(subs[k])}
                bad = set(v) - names
                if bad:
                    raise ValueError(f"unknown keys in config section {k!r}: {sorted(bad)}")
                kwargs[k] = subs[k](**_yaml_floats(subs[k], v))
            else:
                kwargs[k] = v
        missing = [k for k in subs if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing sections {missing} (or give `preset: tiny|base|large`)")
        cfg = cls(**_yaml_floats(cls, kwargs))
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MPLUG2Config":
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if "model" in d and isinstance(d["model"], dict) and "vision" not in d and "preset" not in d:
            d = d["model"]  # accept a run YAML with a `model:` section
        return cls.from_dict(d)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "MPLUG2Config":
        """Raise ``ValueError`` on any combination that would build a wrong model."""
        v, t, fu, de = self.vision, self.text, self.fusion, self.decoder
        errs: list[str] = []
        for name, val in [("vision.width", v.width), ("vision.layers", v.layers), ("vision.heads", v.heads),
                          ("vision.patch_size", v.patch_size), ("vision.image_res", v.image_res),
                          ("text.hidden", t.hidden), ("text.layers", t.layers), ("text.heads", t.heads),
                          ("text.intermediate", t.intermediate), ("text.vocab_size", t.vocab_size),
                          ("text.max_positions", t.max_positions), ("text.num_latents", t.num_latents),
                          ("decoder.layers", de.layers), ("fusion.stride_layer", fu.stride_layer),
                          ("num_frames", self.num_frames), ("beam", self.beam), ("gen_max_len", self.gen_max_len)]:
            if not isinstance(val, int) or val <= 0:
                errs.append(f"{name} must be a positive int, got {val!r}")
        if fu.layers < 0:
            errs.append(f"fusion.layers must be >= 0, got {fu.layers}")
        numbers = [(f"{prefix}{name}", getattr(obj, name))
                   for prefix, obj in (("", self), ("vision.", v), ("text.", t), ("fusion.", fu), ("decoder.", de))
                   for name in float_fields(type(obj))]
        for name, val in [*numbers, ("embed_dim", self.embed_dim), ("queue_size", self.queue_size)]:
            if isinstance(val, bool) or not isinstance(val, (int, float)):   # a YAML typo, not a number
                errs.append(f"{name} must be a number, got {val!r}")
        if errs:
            raise ValueError("; ".join(errs))
        if v.width % v.heads:
            errs.append(f"vision.heads={v.heads} does not divide vision.width={v.width}")
        if t.hidden % t.heads:
            errs.append(f"text.heads={t.heads} does not divide text.hidden={t.hidden}")
        if v.image_res % v.patch_size:
            errs.append(f"vision.patch_size={v.patch_size} does not divide image_res={v.image_res}")
        if t.num_uni_layer != 2:
            errs.append(f"text.num_uni_layer must be 2 (the latents/visual role swap needs exactly two layers), "
                        f"got {t.num_uni_layer}")
        if t.layers < t.num_uni_layer:
            errs.append(f"text.layers={t.layers} < num_uni_layer={t.num_uni_layer}")
        if v.image_mode not in IMAGE_MODES:
            errs.append(f"vision.image_mode must be one of {IMAGE_MODES}, got {v.image_mode!r}")
        if not 0.0 <= v.drop_path < 1.0:
            errs.append(f"vision.drop_path must be in [0, 1), got {v.drop_path}")
        if not 0 < v.lt_bottleneck_ratio <= 1:
            errs.append(f"vision.lt_bottleneck_ratio must be in (0, 1], got {v.lt_bottleneck_ratio}")
        for name, p in [("text.hidden_dropout", t.hidden_dropout), ("text.attn_dropout", t.attn_dropout)]:
            if not 0.0 <= p < 1.0:
                errs.append(f"{name} must be in [0, 1), got {p}")
        if not 0 <= t.pad_token_id < t.vocab_size:
            errs.append(f"text.pad_token_id={t.pad_token_id} outside vocab of {t.vocab_size}")
        for name, tid in [("decoder.bos_token_id", de.bos_token_id), ("decoder.eos_token_id", de.eos_token_id)]:
            if not 0 <= tid < t.vocab_size:
                errs.append(f"{name}={tid} outside vocab of {t.vocab_size}")
        if self.gen_min_len > self.gen_max_len or self.gen_min_len < 0:
            errs.append(f"gen_min_len={self.gen_min_len} must be in [0, gen_max_len={self.gen_max_len}]")
        if max(self.max_text_len, self.max_answer_len, self.gen_max_len + 1) > t.max_positions:
            errs.append(f"text lengths exceed text.max_positions={t.max_positions}")
        if self.embed_dim <= 0 or self.queue_size < 0:
            errs.append("embed_dim must be > 0 and queue_size >= 0")
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            errs.append("momentum and alpha must be in [0, 1]")
        if not 0.0 <= self.itm_random_negatives <= 1.0:
            errs.append(f"itm_random_negatives={self.itm_random_negatives} must be in [0, 1]")
        if not 0.0 <= self.itm_reversed_negatives <= 1.0:
            errs.append(f"itm_reversed_negatives={self.itm_reversed_negatives} must be in [0, 1]")
        if errs:
            raise ValueError("invalid MPLUG2Config: " + "; ".join(errs))
        return self


_BERT_BASE_TEXT = dict(vocab_size=30522, max_positions=512, hidden_dropout=0.1, attn_dropout=0.1, num_latents=50)

_PRESETS: dict[str, MPLUG2Config] = {
    "tiny": MPLUG2Config(
        vision=VisionConfig(width=32, layers=2, heads=2, patch_size=8, image_res=32),
        text=TextConfig(vocab_size=128, hidden=32, layers=3, heads=2, intermediate=64, max_positions=64,
                        hidden_dropout=0.0, attn_dropout=0.0, num_latents=4),
        fusion=FusionConfig(layers=2, stride_layer=1),
        decoder=DecoderConfig(layers=2, bos_token_id=2, eos_token_id=3),
        embed_dim=16, queue_size=32, num_frames=4, max_text_len=12, max_answer_len=6,
        beam=2, gen_max_len=5, gen_min_len=1, tokenizer="tiny",
    ),
    "base": MPLUG2Config(
        vision=VisionConfig(width=768, layers=12, heads=12, patch_size=16, image_res=224),
        text=TextConfig(hidden=768, layers=12, heads=12, intermediate=3072, **_BERT_BASE_TEXT),
        fusion=FusionConfig(layers=3, stride_layer=100),
        decoder=DecoderConfig(layers=12),
        embed_dim=256, queue_size=65536, num_frames=16, max_text_len=50, max_answer_len=10,
        beam=5, gen_max_len=20, gen_min_len=1,
    ),
    "large": MPLUG2Config(
        vision=VisionConfig(width=1024, layers=24, heads=16, patch_size=14, image_res=224),
        text=TextConfig(hidden=1024, layers=24, heads=16, intermediate=4096, **_BERT_BASE_TEXT),
        fusion=FusionConfig(layers=6, stride_layer=1000),
        decoder=DecoderConfig(layers=12),
        embed_dim=256, queue_size=65536, num_frames=16, max_text_len=50, max_answer_len=10,
        beam=5, gen_max_len=20, gen_min_len=1, activation_checkpointing=True, tokenizer="bert-large-uncased",
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def _yaml_floats(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with float fields given in YAML 1.1's string form (PyYAML reads ``temp: 7e-2`` as ``"7e-2"``) as
    numbers, as the run config's sections take them; anything else is left for :meth:`MPLUG2Config.validate`."""
    floats = float_fields(cls)
    return {k: float_from_text(v) if k in floats else v for k, v in raw.items()}
