"""Text encoder (post-LN BERT) whose last two layers double as the universal layers (model-spec 3.2, 3.3).

The text path runs all N layers without cross-attention, so it equals Hugging Face ``BertModel`` exactly. The
visual path (``universal``) reuses the self-attention and FFN of layers N-2 and N-1 and adds their own
cross-attentions: latents attend to the visual tokens (layer N-2), then the visual tokens attend to the updated
latents (layer N-1, roles swapped), and ``V = Dropout(LN_visn(V0 + V'))``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug2.config import TextConfig
from mplug2.models.attention import BertEmbeddings, BertLayer, additive_mask, checkpointed, init_bert_weights


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        d = cfg.hidden
        self.embeddings = BertEmbeddings(cfg.vocab_size, d, cfg.max_positions, cfg.type_vocab_size, cfg.ln_eps,
                                         cfg.hidden_dropout, cfg.pad_token_id)
        first_uni = cfg.layers - cfg.num_uni_layer
        self.layer = nn.ModuleList(
            BertLayer(d, cfg.heads, cfg.intermediate, cfg.ln_eps, cfg.hidden_dropout, cfg.attn_dropout,
                      cross_attention=i >= first_uni)
            for i in range(cfg.layers))
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, d))
        self.visn_norm = nn.LayerNorm(d, eps=cfg.ln_eps)  # release `visn_emb_norm`
        self.visn_dropout = nn.Dropout(cfg.hidden_dropout)
        init_bert_weights(self, cfg.init_std)
        nn.init.normal_(self.latents, std=1.0)  # release: randn, kept for parity

    @property
    def universal_layers(self) -> tuple[BertLayer, BertLayer]:
        return self.layer[-2], self.layer[-1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and 1/0 mask -> T (B, L, D); equals ``BertModel.last_hidden_state`` at non-pad positions."""
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ in shape")
        x = self.embeddings(input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.layer:
            x = checkpointed(layer, x, mask, enabled=self.activation_checkpointing)
        return x

    def _uni_queries(self, v0: Tensor) -> Tensor:
        a, _ = self.universal_layers
        q = self.latents.to(v0.dtype).expand(v0.shape[0], -1, -1)
        return a(q, None, v0, None)

    def _uni_visual(self, v0: Tensor, q: Tensor) -> Tensor:
        _, b = self.universal_layers
        return b(v0, None, q, None)

    def universal(self, v0: Tensor, compress: bool = False) -> tuple[Tensor, Tensor]:
        """V0 (B, Nv, D) -> (V, Q'): V (B, Nv, D) = Dropout(LN(V0 + V')), or with ``compress`` the compressed
        sequence ``Dropout(LN([V0_cls ; Q']))`` of length 1 + num_latents (layer N-1 is then skipped)."""
        ck = self.activation_checkpointing
        q = checkpointed(self._uni_queries, v0, enabled=ck)
        if compress:
            return self.visn_dropout(self.visn_norm(torch.cat([v0[:, :1], q], dim=1))), q
        v = checkpointed(self._uni_visual, v0, q, enabled=ck)
        return self.visn_dropout(self.visn_norm(v0 + v)), q
