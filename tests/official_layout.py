"""Checkpoints in the released mPLUG-2 layout (X-PLUG/mPLUG-2 ``MPLUG2`` caption / QA ``state_dict``), written for
any model config: official key names and shapes, spelled here from ``design/official-ckpt`` (README table)
independently of :mod:`mplug2.official`, with the tensors the release allocates but never uses, the tied LM-head
copies and (QA) the momentum twins. Used by the import tests and ``bench/bench_official.py``.

:func:`release_layout` lists ``(official name, shape, our name or None)``; ``None`` marks a tensor with no
counterpart in ours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mplug2.config import MPLUG2Config

Entry = tuple[str, tuple[int, ...], "str | None"]
CLIP_TEXT_LARGE = dict(width=768, layers=12, context=77, vocab=49408)   # OpenAI ViT-L/14's text tower


def _bert_layer(prefix: str, ours: str | None, d: int, inter: int, cross: bool) -> list[Entry]:
    out: list[Entry] = []
    parts = ["attention"] + (["crossattention"] if cross else [])
    for att in parts:
        for proj in ("query", "key", "value"):
            out += [(f"{prefix}.{att}.self.{proj}.weight", (d, d), ours and f"{ours}.{att}.self.{proj}.weight"),
                    (f"{prefix}.{att}.self.{proj}.bias", (d,), ours and f"{ours}.{att}.self.{proj}.bias")]
        out += [(f"{prefix}.{att}.output.dense.weight", (d, d), ours and f"{ours}.{att}.output.dense.weight"),
                (f"{prefix}.{att}.output.dense.bias", (d,), ours and f"{ours}.{att}.output.dense.bias"),
                (f"{prefix}.{att}.output.LayerNorm.weight", (d,), ours and f"{ours}.{att}.output.LayerNorm.weight"),
                (f"{prefix}.{att}.output.LayerNorm.bias", (d,), ours and f"{ours}.{att}.output.LayerNorm.bias")]
    out += [(f"{prefix}.intermediate.dense.weight", (inter, d), ours and f"{ours}.intermediate.dense.weight"),
            (f"{prefix}.intermediate.dense.bias", (inter,), ours and f"{ours}.intermediate.dense.bias"),
            (f"{prefix}.output.dense.weight", (d, inter), ours and f"{ours}.output.dense.weight"),
            (f"{prefix}.output.dense.bias", (d,), ours and f"{ours}.output.dense.bias"),
            (f"{prefix}.output.LayerNorm.weight", (d,), ours and f"{ours}.output.LayerNorm.weight"),
            (f"{prefix}.output.LayerNorm.bias", (d,), ours and f"{ours}.output.LayerNorm.bias")]
    return out


def _vision_ffn(prefix: str, d: int, inter: int) -> list[Entry]:
    return [(f"{prefix}.intermediate_vision.dense.weight", (inter, d), None),
            (f"{prefix}.intermediate_vision.dense.bias", (inter,), None),
            (f"{prefix}.output_vision.dense.weight", (d, inter), None),
            (f"{prefix}.output_vision.dense.bias", (d,), None),
            (f"{prefix}.output_vision.LayerNorm.weight", (d,), None),
            (f"{prefix}.output_vision.LayerNorm.bias", (d,), None)]


def _embeddings(prefix: str, ours: str | None, v: int, p: int, d: int) -> list[Entry]:
    return [(f"{prefix}.position_ids", (1, p), None),
            (f"{prefix}.word_embeddings.weight", (v, d), ours and f"{ours}.word_embeddings.weight"),
            (f"{prefix}.position_embeddings.weight", (p, d), ours and f"{ours}.position_embeddings.weight"),
            (f"{prefix}.token_type_embeddings.weight", (2, d), ours and f"{ours}.token_type_embeddings.weight"),
            (f"{prefix}.LayerNorm.weight", (d,), ours and f"{ours}.LayerNorm.weight"),
            (f"{prefix}.LayerNorm.bias", (d,), ours and f"{ours}.LayerNorm.bias")]


def _resblock(prefix: str, ours: str | None, w: int, lt: int | None) -> list[Entry]:
    out: list[Entry] = []
    if lt is not None:
        for i in (1, 2):
            o = ours and f"{ours}.lt{i}"
            out += [(f"{prefix}.lmhra{i}.ln.weight", (w,), o and f"{o}.ln.weight"),
                    (f"{prefix}.lmhra{i}.ln.bias", (w,), o and f"{o}.ln.bias"),
                    (f"{prefix}.lmhra{i}.down_proj.weight", (lt, w, 1, 1, 1), o and f"{o}.down_proj.weight"),
                    (f"{prefix}.lmhra{i}.down_proj.bias", (lt,), o and f"{o}.down_proj.bias"),
                    (f"{prefix}.lmhra{i}.conv.weight", (lt, 1, 3, 1, 1), o and f"{o}.conv.weight"),
                    (f"{prefix}.lmhra{i}.conv.bias", (lt,), o and f"{o}.conv.bias"),
                    (f"{prefix}.lmhra{i}.up_proj.weight", (w, lt, 1, 1, 1), o and f"{o}.up_proj.weight"),
                    (f"{prefix}.lmhra{i}.up_proj.bias", (w,), o and f"{o}.up_proj.bias")]
    for name, shape in [("attn.in_proj_weight", (3 * w, w)), ("attn.in_proj_bias", (3 * w,)),
                        ("attn.out_proj.weight", (w, w)), ("attn.out_proj.bias", (w,)),
                        ("ln_1.weight", (w,)), ("ln_1.bias", (w,)), ("mlp.c_fc.weight", (4 * w, w)),
                        ("mlp.c_fc.bias", (4 * w,)), ("mlp.c_proj.weight", (w, 4 * w)), ("mlp.c_proj.bias", (w,)),
                        ("ln_2.weight", (w,)), ("ln_2.bias", (w,))]:
        out.append((f"{prefix}.{name}", shape, ours and f"{ours}.{name}"))
    return out


def release_layout(cfg: MPLUG2Config, task: str, fusion_allocated: int,
                   clip_text: dict | None = None) -> list[Entry]:
    """Every key of the release's ``model.state_dict()`` for a model of ``cfg``'s sizes."""
    v, t = cfg.vision, cfg.text
    ct = clip_text or dict(width=16, layers=1, context=8, vocab=50)
    w, d, inter, cw = v.width, t.hidden, t.intermediate, ct["width"]
    e: list[Entry] = [("visn_emb_norm.weight", (d,), "text.visn_norm.weight"),
                      ("visn_emb_norm.bias", (d,), "text.visn_norm.bias")]
    # CLIP (XCLIP): the text tower and the image projection are allocated, never used.
    e += [("visual_encoder.positional_embedding", (ct["context"], cw), None),
          ("visual_encoder.text_projection", (cw, cw), None), ("visual_encoder.logit_scale", (), None),
          ("visual_encoder.token_embedding.weight", (ct["vocab"], cw), None),
          ("visual_encoder.ln_final.weight", (cw,), None), ("visual_encoder.ln_final.bias", (cw,), None)]
    for i in range(ct["layers"]):
        e += _resblock(f"visual_encoder.transformer.resblocks.{i}", None, cw, None)
    e += [("visual_encoder.visual.class_embedding", (w,), "vision.class_embedding"),
          ("visual_encoder.visual.positional_embedding", (v.grid ** 2 + 1, w), "vision.positional_embedding"),
          ("visual_encoder.visual.proj", (w, cw), None),
          ("visual_encoder.visual.conv1.weight", (w, 3, 1, v.patch_size, v.patch_size), "vision.conv1.weight"),
          ("visual_encoder.visual.ln_pre.weight", (w,), "vision.ln_pre.weight"),
          ("visual_encoder.visual.ln_pre.bias", (w,), "vision.ln_pre.bias"),
          ("visual_encoder.visual.ln_post.weight", (w,), "vision.ln_post.weight"),
          ("visual_encoder.visual.ln_post.bias", (w,), "vision.ln_post.bias")]
    for i in range(v.layers):
        e += _resblock(f"visual_encoder.visual.transformer.resblocks.{i}", f"vision.blocks.{i}", w, v.lt_bottleneck)
    # Text encoder: the last two layers are the universal layers (cross-attention, unused vision FFN, latents).
    e += _embeddings("text_encoder.embeddings", "text.embeddings", t.vocab_size, t.max_positions, d)
    uni = t.layers - 2
    for i in range(t.layers):
        pre = f"text_encoder.encoder.layer.{i}"
        e += _bert_layer(pre, f"text.layer.{i}", d, inter, cross=i >= uni)
        if i >= uni:
            e += _vision_ffn(pre, d, inter)
        if i == uni:
            e.append((f"{pre}.latents", (t.num_latents, d), "text.latents"))
    # Fusion: `fusion_allocated` layers, the last cfg.fusion.layers run; connected layers' cross-attention unused.
    e += _embeddings("fusion_encoder.embeddings", None, t.vocab_size, t.max_positions, d)
    off = fusion_allocated - cfg.fusion.layers
    for i in range(fusion_allocated):
        j = i - off
        layer = _bert_layer(f"fusion_encoder.encoder.layer.{i}", f"fusion.layer.{j}" if j >= 0 else None, d, inter,
                            cross=True)
        if j >= 0 and cfg.fusion.is_connected(j):
            layer = [(k, s, None if ".crossattention." in k else o) for k, s, o in layer]
        e += layer
    # Decoder (BertLMHeadModel): every layer cross-attends; BertLayer allocates latents / vision FFNs at N-2.
    e += _embeddings("text_decoder.bert.embeddings", "decoder.embeddings", t.vocab_size, t.max_positions, d)
    n = cfg.decoder.layers
    for i in range(n):
        pre = f"text_decoder.bert.encoder.layer.{i}"
        e += _bert_layer(pre, f"decoder.layer.{i}", d, inter, cross=True)
        if i >= n - 2:
            e += _vision_ffn(pre, d, inter)
        if i == n - 2:
            e.append((f"{pre}.latents", (t.num_latents, d), None))
    e += [("text_decoder.cls.predictions.bias", (t.vocab_size,), "decoder.lm_head.bias"),
          ("text_decoder.cls.predictions.transform.dense.weight", (d, d), "decoder.lm_head.transform.dense.weight"),
          ("text_decoder.cls.predictions.transform.dense.bias", (d,), "decoder.lm_head.transform.dense.bias"),
          ("text_decoder.cls.predictions.transform.LayerNorm.weight", (d,),
           "decoder.lm_head.transform.LayerNorm.weight"),
          ("text_decoder.cls.predictions.transform.LayerNorm.bias", (d,), "decoder.lm_head.transform.LayerNorm.bias"),
          ("text_decoder.cls.predictions.decoder.weight", (t.vocab_size, d), None),    # tied: word embeddings
          ("text_decoder.cls.predictions.decoder.bias", (t.vocab_size,), None)]        # tied: predictions.bias
    if task == "qa":
        e += [(k.split(".", 1)[0] + "_m." + k.split(".", 1)[1], s, None) for k, s, _ in e]
    return e


def release_state_dict(layout: list[Entry], dtype: torch.dtype = torch.float32,
                       fill: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for ``layout``: ``fill(our_name, shape)`` for mapped ones (else random), random for the rest,
    with the two tied LM-head copies equal to their sources."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape, ours in layout:
        if fill is not None and ours is not None:
            sd[name] = fill(ours, shape).to(dtype)
        else:
            sd[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    for pre in ("text_decoder", "text_decoder_m"):
        if f"{pre}.cls.predictions.decoder.weight" in sd:
            sd[f"{pre}.cls.predictions.decoder.weight"] = sd[f"{pre}.bert.embeddings.word_embeddings.weight"]
            sd[f"{pre}.cls.predictions.decoder.bias"] = sd[f"{pre}.cls.predictions.bias"]
    return sd
