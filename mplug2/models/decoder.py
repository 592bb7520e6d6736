"""Shared causal decoder (model-spec 3.5): BERT layers with causal self-attention, cross-attention to a memory and a
tied LM head. One class serves captioning (``token_mean``), VQA (``sequence_sum``) and prefix LM, with optional
soft-target distillation, and an incremental KV-cached step for generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.config import DecoderConfig, TextConfig
from mplug2.models.attention import (BertEmbeddings, BertLayer, BertLMHead, KVCache, additive_mask, causal_mask,
                                     checkpointed, init_bert_weights)

REDUCTIONS = ("token_mean", "sequence_sum", "none")


@dataclass
class DecoderOutput:
    loss: Tensor | None  # scalar, or (B,) per-sequence sums for reduction="none"
    logits: Tensor       # (B, L, V), unshifted


class TextDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, text: TextConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.text_cfg = text
        self.activation_checkpointing = activation_checkpointing
        d = text.hidden
        self.embeddings = BertEmbeddings(text.vocab_size, d, text.max_positions, text.type_vocab_size, text.ln_eps,
                                         text.hidden_dropout, text.pad_token_id)
        self.layer = nn.ModuleList(
            BertLayer(d, text.heads, text.intermediate, text.ln_eps, text.hidden_dropout, text.attn_dropout,
                      cross_attention=True)
            for _ in range(cfg.layers))
        self.lm_head = BertLMHead(d, text.vocab_size, text.ln_eps, self.embeddings.word_embeddings)
        init_bert_weights(self, text.init_std)

    # ------------------------------------------------------------------ full (training) pass
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        self_mask = additive_mask(causal_mask(attention_mask), x.dtype)
        mem_mask = additive_mask(memory_mask, x.dtype)
        for layer in self.layer:
            x = checkpointed(layer, x, self_mask, memory, mem_mask, enabled=self.activation_checkpointing)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor, memory: Tensor, memory_mask: Tensor,
                labels: Tensor | None = None, *, reduction: str = "token_mean", soft_logits: Tensor | None = None,
                alpha: float = 0.0) -> DecoderOutput:
        """Teacher-forced pass. ``labels`` (B, L) use -100 for ignored positions (pads, prompt); the loss compares
        logits at t with labels at t+1. With ``soft_logits`` (momentum decoder, same shape as logits) each token's
        loss is ``(1-alpha)*CE + alpha*softCE``."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, memory, memory_mask))
        if labels is None:
            return DecoderOutput(loss=None, logits=logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        shifted = logits[:, :-1].float()
        target = labels[:, 1:]
        valid = target.ne(-100)
        tok = F.cross_entropy(shifted.transpose(1, 2), target, ignore_index=-100, reduction="none")
        if soft_logits is not None and alpha > 0:
            soft = F.softmax(soft_logits[:, :-1].float(), dim=-1)
            soft_ce = -(soft * F.log_softmax(shifted, dim=-1)).sum(-1)
            tok = (1 - alpha) * tok + alpha * soft_ce
        tok = tok * valid
        if reduction == "token_mean":
            loss = tok.sum() / valid.sum().clamp(min=1)
        elif reduction == "sequence_sum":
            loss = tok.sum(dim=1).mean()
        else:
            loss = tok.sum(dim=1)
        return DecoderOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ incremental (generation) pass
    def new_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layer]

    def step(self, input_ids: Tensor, memory: Tensor, memory_add_mask: Tensor, cache: list[KVCache]) -> Tensor:
        """Feed the new tokens ``input_ids`` (N, n) after ``cache`` -> logits of the last position (N, V)."""
        past = cache[0].length
        n = input_ids.shape[1]
        x = self.embeddings(input_ids, past_len=past)
        keep = torch.ones(input_ids.shape[0], past + n, dtype=torch.long, device=input_ids.device)
        self_mask = additive_mask(causal_mask(keep, past), x.dtype)
        for layer, c in zip(self.layer, cache):
            x = layer.forward_cached(x, self_mask, memory, memory_add_mask, c)
        return self.lm_head(x[:, -1])

    def last_logits(self, input_ids: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Uncached reference: recompute the whole prefix -> logits of the last position (N, V)."""
        keep = torch.ones_like(input_ids)
        return self.lm_head(self.hidden_states(input_ids, keep, memory, memory_mask)[:, -1])
