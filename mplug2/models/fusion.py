"""Fusion encoder (model-spec 3.4): co-attention layers, plus connected-attention layers every ``stride_layer``.

Returns both streams ``(V_f, T_f)``: the visual stream bypasses co-attention layers unchanged (mPLUG's
cross-modal skip connection) and is only updated by connected-attention layers, where one self-attention runs
over ``[V ; T]`` and ``V <- V + V_new``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug2.config import FusionConfig, TextConfig
from mplug2.models.attention import BertLayer, additive_mask, checkpointed, init_bert_weights


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, text: TextConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        # Connected-attention layers never use a cross-attention, so they do not allocate one (model-spec 8:
        # allocate only what runs; unused parameters also break DDP without find_unused_parameters).
        self.layer = nn.ModuleList(
            BertLayer(text.hidden, text.heads, text.intermediate, text.ln_eps, text.hidden_dropout,
                      text.attn_dropout, cross_attention=not self.is_connected(j))
            for j in range(cfg.layers))
        init_bert_weights(self, text.init_std)

    def is_connected(self, j: int) -> bool:
        return self.cfg.is_connected(j)

    @staticmethod
    def _connected(layer: BertLayer, v: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = layer.ffn(layer.attention(torch.cat([v, t], dim=1), mask))
        nv = v.shape[1]
        return v + out[:, :nv], out[:, nv:]

    def forward(self, text: Tensor, text_mask: Tensor, vis: Tensor, vis_mask: Tensor) -> tuple[Tensor, Tensor]:
        """T (B, L, D) + mask, V (B, Nv, D) + mask -> (V_f, T_f)."""
        if text.shape[0] != vis.shape[0]:
            raise ValueError(f"batch sizes differ: text {text.shape[0]} vs visual {vis.shape[0]}")
        t_add = additive_mask(text_mask, text.dtype)
        v_add = additive_mask(vis_mask, text.dtype)
        both_add = None
        ck = self.activation_checkpointing
        for j, layer in enumerate(self.layer):
            if self.is_connected(j):
                if both_add is None:
                    both_add = additive_mask(torch.cat([vis_mask, text_mask], dim=1), text.dtype)
                vis, text = checkpointed(self._connected, layer, vis, text, both_add, enabled=ck)
            else:
                text = checkpointed(layer, text, t_add, vis, v_add, enabled=ck)
        return vis, text
