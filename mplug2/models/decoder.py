"""Shared causal decoder (model-spec 3.5): BERT layers with causal self-attention, cross-attention to a memory and a
tied LM head. One class serves captioning (``token_mean``), VQA (``sequence_sum``) and prefix LM, with optional
soft-target distillation, and an incremental KV-cached step for generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.config import DecoderConfig, TextConfig
from mplug2.models.attention import (BertEmbeddings, BertLayer, BertLMHead, KVCache, additive_mask, causal_mask,
                                     checkpointed, init_bert_weights)

REDUCTIONS = ("token_mean", "sequence_sum", "none")


class DecoderOutput:
    """``loss`` (scalar, or (B,) per-sequence sums for reduction="none") and the LM head's ``logits`` (B, L, V),
    unshifted. The vocabulary projection is the costliest op of a small decoder (V = 30522), so the loss projects
    only the positions that carry a target and ``logits`` is computed on first use."""

    def __init__(self, loss: Tensor | None, hidden: Tensor, head: nn.Module):
        self.loss = loss
        self.hidden = hidden   # (B, L, D): the last layer's states
        self._head = head
        self._logits: Tensor | None = None

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            self._logits = self._head(self.hidden)
        return self._logits

    def logits_at(self, select: Tensor) -> Tensor:
        """Logits (N, V) of the positions where the (B, L) boolean ``select`` is true."""
        return self._logits[select] if self._logits is not None else self._head(self.hidden[select])


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
                labels: Tensor | None = None, *, reduction: str = "token_mean",
                soft_logits: Tensor | DecoderOutput | None = None, alpha: float = 0.0) -> DecoderOutput:
        """Teacher-forced pass. ``labels`` (B, L) use -100 for ignored positions (pads, prompt); the loss compares
        logits at t with labels at t+1. With ``soft_logits`` (the momentum decoder's output, or logits of the same
        shape as ours) each token's loss is ``(1-alpha)*CE + alpha*softCE``."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        out = DecoderOutput(None, self.hidden_states(input_ids, attention_mask, memory, memory_mask), self.lm_head)
        if labels is None:
            return out
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        target = labels[:, 1:]
        valid = target.ne(-100)
        at = torch.cat([valid, valid.new_zeros(valid.shape[0], 1)], 1)   # position t predicts the label at t + 1
        logits = out.logits_at(at).float()                      # (N, V): only the positions that carry a loss
        tok_valid = F.cross_entropy(logits, target[valid], reduction="none")
        if soft_logits is not None and alpha > 0:
            if isinstance(soft_logits, DecoderOutput):
                with torch.no_grad():          # a teacher's targets: projected here, but never differentiated
                    soft_at = soft_logits.logits_at(at)
            else:
                soft_at = soft_logits[at]
            soft = F.softmax(soft_at.float(), dim=-1)
            tok_valid = (1 - alpha) * tok_valid - alpha * (soft * F.log_softmax(logits, dim=-1)).sum(-1)
        tok = tok_valid.new_zeros(valid.shape).masked_scatter(valid, tok_valid)
        if reduction == "token_mean":
            loss = tok.sum() / valid.sum().clamp(min=1)
        elif reduction == "sequence_sum":
            loss = tok.sum(dim=1).mean()
        else:
            loss = tok.sum(dim=1)
        out.loss = loss
        return out

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
