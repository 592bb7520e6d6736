"""Import public BERT and CLIP weights into an ``MPLUG2`` and report where every parameter came from.

Model-spec 3.1 (CLIP table), 3.2 (BERT -> text encoder), 3.4 (fusion layer j <- BERT layer N-F+j), 3.5 (decoder
layer i <- BERT layer i, LM head <- ``cls.predictions``) and 8 (no silent loading). Every source key is either mapped,
or deliberately dropped (pooler, NSP head, buffers, CLIP text tower, projections), or an error. Every model
parameter not filled is reported as *new* (cross-attentions, latents, LT modules, ...).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mplug2.config import MPLUG2Config, VisionConfig
from mplug2.models.vision import resize_pos_embed

log = logging.getLogger(__name__)

# Tied copies of the word embeddings: present in ``state_dict`` but never loaded on their own.
TIED_KEYS = ("mlm_head.decoder.weight", "decoder.lm_head.decoder.weight")


@dataclass
class ImportReport:
    """Provenance of a weight import: ``loaded`` maps our key -> source description."""

    loaded: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def new_modules(self) -> list[str]:
        """New parameters grouped to module paths, with layer indices kept (e.g. ``fusion.layer.0.crossattention``)."""
        groups = set()
        for k in self.new:
            parts = k.split(".")
            for marker in ("crossattention", "lt1", "lt2", "latents", "visn_norm", "visn_fc", "transform"):
                if marker in parts:
                    groups.add(".".join(parts[: parts.index(marker) + 1]))
                    break
            else:
                groups.add(".".join(parts[:-1]) or k)
        return sorted(groups)

    def summary(self) -> str:
        by_src: dict[str, int] = defaultdict(int)
        for src in self.loaded.values():
            by_src[src.split(":", 1)[0]] += 1
        lines = [f"loaded {len(self.loaded)} tensors (" + ", ".join(f"{k}: {v}" for k, v in sorted(by_src.items()))
                 + f"); dropped {len(self.dropped)} source keys; {len(self.new)} new tensors in "
                 f"{len(self.new_modules())} modules:"]
        lines += [f"  new  {m}" for m in self.new_modules()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint: ``.safetensors``, a torch pickle (``.bin``/``.pt``/``.pth``, ``{"model"|"state_dict":..}``
    unwrapped), an OpenAI TorchScript archive, or a folder holding ``model.safetensors``/``pytorch_model.bin``."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).exists():
                return read_state_dict(p / name)
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as first:  # OpenAI archives are TorchScript
        try:
            obj = torch.jit.load(str(p), map_location="cpu").state_dict()
        except Exception:
            raise ValueError(f"cannot read {p} as a torch checkpoint or TorchScript archive: {first}") from first
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{p} does not hold a state dict")
    return dict(obj)


# ---------------------------------------------------------------------------------------------------- BERT
_BERT_DROP = re.compile(r"^(pooler\.|cls\.seq_relationship\.|embeddings\.position_ids$|embeddings\.token_type_ids$"
                        r"|cls\.predictions\.decoder\.(weight|bias)$)")


def normalize_bert_state(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip ``bert.``, rename legacy ``gamma``/``beta``, drop pooler / NSP / buffers / the tied decoder copy."""
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        key = k[5:] if k.startswith("bert.") else k
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if _BERT_DROP.match(key):
            dropped.append(k)
        else:
            out[key] = v
    return out, dropped


def bert_to_mplug2(sd: dict[str, Tensor], cfg: MPLUG2Config) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Map a ``BertModel``/``BertForPreTraining``/``BertForMaskedLM`` dict onto text encoder, fusion, decoder and
    LM heads. Returns (tensors by our key, source by our key, dropped source keys)."""
    clean, dropped = normalize_bert_state(sd)
    layer_ids = {int(m.group(1)) for k in clean if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    n_src = max(layer_ids) + 1 if layer_ids else 0
    if n_src == 0 or "embeddings.word_embeddings.weight" not in clean:
        raise ValueError("not a BERT state dict: no embeddings.word_embeddings.weight / encoder.layer.* keys")
    t, f_layers, d_layers = cfg.text, cfg.fusion.layers, cfg.decoder.layers
    if n_src < t.layers:
        raise ValueError(f"BERT dict has {n_src} layers, the text encoder needs {t.layers}")
    if n_src < f_layers or n_src < d_layers:
        raise ValueError(f"BERT dict has {n_src} layers; fusion needs {f_layers} and the decoder {d_layers}")
    out: dict[str, Tensor] = {}
    src: dict[str, str] = {}

    def put(ours: str, theirs: str) -> None:
        out[ours] = clean[theirs]
        src[ours] = f"bert:{theirs}"

    used: set[str] = set()
    for k in clean:
        if k.startswith("embeddings."):
            put("text." + k, k)
            put("decoder." + k, k)
            used.add(k)
        elif m := re.match(r"encoder\.layer\.(\d+)\.(.*)$", k):
            i, rest = int(m.group(1)), m.group(2)
            if i < t.layers:
                put(f"text.layer.{i}.{rest}", k)
            j = i - (n_src - f_layers)
            if 0 <= j < f_layers:
                put(f"fusion.layer.{j}.{rest}", k)
            if i < d_layers:
                put(f"decoder.layer.{i}.{rest}", k)
            used.add(k)
        elif k.startswith("cls.predictions."):
            rest = k[len("cls.predictions."):]
            put("mlm_head." + rest, k)
            put("decoder.lm_head." + rest, k)
            used.add(k)
    unexpected = sorted(set(clean) - used)
    if unexpected:
        raise ValueError(f"unexpected keys in the BERT dict: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    unused_layers = sorted({i for i in layer_ids if i >= t.layers and i >= d_layers and i < n_src - f_layers})
    if unused_layers:
        log.warning("BERT layers %s are not used by text encoder, fusion or decoder", unused_layers)
    return out, src, dropped


# ---------------------------------------------------------------------------------------------------- CLIP
_HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENAI_TEXT = re.compile(r"^(token_embedding\.|positional_embedding$|transformer\.|ln_final\.|text_projection$"
                          r"|logit_scale$|input_resolution$|context_length$|vocab_size$)")


def clip_format(sd: dict[str, Tensor]) -> str:
    """``hf`` (``vision_model.``, as on the hub), ``hf-flat`` (transformers 5 ``CLIPVisionModel.state_dict()``,
    no prefix), ``openai`` (``visual.``) or ``openai-visual`` (a bare visual tower)."""
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    if "embeddings.patch_embedding.weight" in sd:
        return "hf-flat"
    if any(k.startswith("visual.") for k in sd):
        return "openai"
    if "conv1.weight" in sd and "class_embedding" in sd:
        return "openai-visual"
    raise ValueError("not a CLIP vision state dict: no vision_model.* / visual.* / conv1.weight keys")


def _inflate_conv(w: Tensor, cfg: VisionConfig) -> Tensor:
    """(Dv, 3, p, p) 2-D patch kernel -> (Dv, 3, kt, p, p): kt=1, or kt=3 with the centre tap (others zero)."""
    if w.dim() == 5:
        w = w[:, :, w.shape[2] // 2]
    if cfg.temporal_downsampling:
        out = torch.zeros(w.shape[0], w.shape[1], 3, *w.shape[2:], dtype=w.dtype)
        out[:, :, 1] = w
        return out
    return w.unsqueeze(2)


def clip_to_vision(sd: dict[str, Tensor], cfg: VisionConfig, prefix: str = "vision."
                   ) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Map an HF ``CLIPVisionModel``/``CLIPModel`` or an OpenAI CLIP dict onto the vision encoder."""
    fmt = clip_format(sd)
    out: dict[str, Tensor] = {}
    src: dict[str, str] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    qkv: dict[int, dict[str, Tensor]] = defaultdict(dict)

    def put(ours: str, theirs: str, value: Tensor) -> None:
        out[prefix + ours] = value
        src[prefix + ours] = f"clip-{fmt}:{theirs}"

    for k, v in sd.items():
        if fmt in ("hf", "hf-flat"):
            hf_prefix = "vision_model." if fmt == "hf" else ""
            if not k.startswith(hf_prefix) or k.startswith(("text_model.", "visual_projection.")):
                if k.startswith(("text_model.", "visual_projection.", "text_projection.")) or k == "logit_scale":
                    dropped.append(k)
                else:
                    unexpected.append(k)
                continue
            r = k[len(hf_prefix):]
            if r == "embeddings.patch_embedding.weight":
                put("conv1.weight", k, _inflate_conv(v, cfg))
            elif r == "embeddings.class_embedding":
                put("class_embedding", k, v)
            elif r == "embeddings.position_embedding.weight":
                put("positional_embedding", k, resize_pos_embed(v, (cfg.grid, cfg.grid)))
            elif r == "embeddings.position_ids":
                dropped.append(k)
            elif m := re.match(r"(pre_layrnorm|post_layernorm)\.(weight|bias)$", r):
                put(("ln_pre" if m.group(1) == "pre_layrnorm" else "ln_post") + "." + m.group(2), k, v)
            elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", r):
                qkv[int(m.group(1))][m.group(2) + m.group(3)] = v
                src.setdefault(f"{prefix}blocks.{m.group(1)}.attn.in_proj_{m.group(3)}", f"clip-{fmt}:{k}")
            elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", r):
                if m.group(2) not in _HF_BLOCK:
                    unexpected.append(k)
                    continue
                put(f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}", k, v)
            else:
                unexpected.append(k)
        else:
            if fmt == "openai":
                if not k.startswith("visual."):
                    (dropped if _OPENAI_TEXT.match(k) else unexpected).append(k)
                    continue
                r = k[len("visual."):]
            else:
                r = k
            if r == "conv1.weight":
                put("conv1.weight", k, _inflate_conv(v, cfg))
            elif r == "positional_embedding":
                put("positional_embedding", k, resize_pos_embed(v, (cfg.grid, cfg.grid)))
            elif r == "proj":
                dropped.append(k)
            elif r == "class_embedding" or re.match(r"(ln_pre|ln_post)\.(weight|bias)$", r):
                put(r, k, v)
            elif m := re.match(r"transformer\.resblocks\.(\d+)\.((attn\.in_proj_(weight|bias))|"
                               r"((attn\.out_proj|ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)))$", r):
                put(f"blocks.{m.group(1)}.{m.group(2)}", k, v)
            else:
                unexpected.append(k)
    if unexpected:
        raise ValueError(f"unexpected keys in the CLIP ({fmt}) dict: {unexpected[:20]}")
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            missing = [c for c in "qkv" if c + kind not in parts]
            if missing:
                raise ValueError(f"CLIP layer {i}: missing {missing} {kind} projections")
            out[f"{prefix}blocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c + kind] for c in "qkv"], dim=0)
    layers = {int(m.group(1)) for k in out if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    if layers and max(layers) + 1 != cfg.layers:
        raise ValueError(f"CLIP dict has {max(layers) + 1} blocks, the config asks for {cfg.layers}")
    return out, src, dropped


# ---------------------------------------------------------------------------------------------------- apply
def load_pretrained(model: nn.Module, *, bert: dict[str, Tensor] | str | Path | None = None,
                    clip: dict[str, Tensor] | str | Path | None = None) -> ImportReport:
    """Fill ``model`` (an ``MPLUG2``) from BERT and/or CLIP weights; returns the provenance report.

    Tensors are cast to each parameter's dtype (OpenAI archives hold fp16). A shape mismatch is an error."""
    cfg: MPLUG2Config = model.config
    mapped: dict[str, Tensor] = {}
    report = ImportReport()
    if bert is not None:
        sd = bert if isinstance(bert, dict) else read_state_dict(bert)
        t, s, d = bert_to_mplug2(sd, cfg)
        mapped.update(t)
        report.loaded.update(s)
        report.dropped += d
    if clip is not None:
        sd = clip if isinstance(clip, dict) else read_state_dict(clip)
        if cfg.vision.width != cfg.text.hidden and model.visn_fc is None:
            raise AssertionError("visn_fc missing for Dv != D")
        t, s, d = clip_to_vision(sd, cfg.vision)
        mapped.update(t)
        report.loaded.update(s)
        report.dropped += d
    own = model.state_dict()
    bad = sorted(k for k in mapped if k not in own)
    if bad:
        raise ValueError(f"unexpected keys: source tensors map to parameters the model does not have: {bad[:20]}")
    with torch.no_grad():
        for k, v in mapped.items():
            if own[k].shape != v.shape:
                raise ValueError(f"shape mismatch for {k}: model {tuple(own[k].shape)} vs source {tuple(v.shape)} "
                                 f"({report.loaded.get(k)})")
            own[k].copy_(v.to(own[k].dtype))
    tied_ok = {k for k in TIED_KEYS if k in own}
    report.new = sorted(k for k in own if k not in mapped and k not in tied_ok)
    log.info("weight import: %s", report.summary())
    return report
