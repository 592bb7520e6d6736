"""BERT building blocks shared by the text encoder, the fusion encoder and the decoder.

Parameter names follow Hugging Face ``BertModel`` (``attention.self.query``, ``output.LayerNorm``, ...) so that the
weight import of model-spec 3.2 is a key table, not code. Every attention goes through
``F.scaled_dot_product_attention`` with an additive float mask (0 = keep, dtype-min = drop), which matches BERT's
extended mask: a fully masked row gives a uniform distribution instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Lk) or (B, Lq, Lk) 1/0 keep-mask -> (B, 1, Lq|1, Lk) additive mask for SDPA."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, :, :]
    else:
        raise ValueError(f"attention mask must be (B, Lk) or (B, Lq, Lk), got shape {tuple(mask.shape)}")
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def causal_mask(attention_mask: Tensor, past_len: int = 0) -> Tensor:
    """Lower-triangular AND key-padding keep-mask (B, Lq, past_len + Lq) for a decoder."""
    b, total = attention_mask.shape
    lq = total - past_len
    tri = torch.ones(lq, total, dtype=torch.bool, device=attention_mask.device).tril(diagonal=past_len)
    return tri[None] & attention_mask[:, None, :].bool()


@dataclass
class KVCache:
    """Per-layer cache: self-attention K/V grow by one step; cross-attention K/V are computed once."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))

    @property
    def length(self) -> int:
        return 0 if self.self_k is None else self.self_k.shape[2]


class BertSelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (HF names); K/V may come from another width."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, kv_width: int | None = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"heads={heads} does not divide hidden={hidden}")
        kv_width = kv_width or hidden
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.attn_dropout = attn_dropout

    def split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.key(x)), self.split(self.value(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: Tensor, mask: Tensor | None = None, kv: Tensor | None = None) -> Tensor:
        """``mask`` is additive (B, 1, Lq|1, Lk); ``kv`` defaults to ``x`` (self-attention)."""
        k, v = self.project_kv(x if kv is None else kv)
        return self.attend(self.split(self.query(x)), k, v, mask)


class BertSelfOutput(nn.Module):
    """Post-LN residual: LN(x + Dropout(dense(h)))."""

    def __init__(self, hidden: int, in_dim: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, hidden_dropout: float, attn_dropout: float,
                 kv_width: int | None = None):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, attn_dropout, kv_width)
        self.output = BertSelfOutput(hidden, hidden, eps, hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, kv: Tensor | None = None) -> Tensor:
        return self.output(self.self(x, mask, kv), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT


class BertLayer(nn.Module):
    """Post-LN BERT layer: self-attention [-> cross-attention] -> FFN.

    ``forward`` covers encoder and fusion use; ``forward_cached`` is the decoder's incremental path, where the
    self-attention K/V of previous steps come from ``cache`` and the cross-attention K/V are computed once.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, hidden_dropout: float,
                 attn_dropout: float, cross_attention: bool = False, cross_width: int | None = None):
        super().__init__()
        self.attention = BertAttention(hidden, heads, eps, hidden_dropout, attn_dropout)
        self.crossattention = (BertAttention(hidden, heads, eps, hidden_dropout, attn_dropout, cross_width)
                               if cross_attention else None)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertSelfOutput(hidden, intermediate, eps, hidden_dropout)

    def ffn(self, x: Tensor) -> Tensor:
        return self.output(self.intermediate(x), x)

    def cross(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        if self.crossattention is None:
            raise RuntimeError("this layer has no cross-attention")
        return self.crossattention(x, memory_mask, memory)

    def forward(self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        x = self.attention(x, mask)
        if memory is not None:
            x = self.cross(x, memory, memory_mask)
        return self.ffn(x)

    def forward_cached(self, x: Tensor, mask: Tensor, memory: Tensor, memory_mask: Tensor | None,
                       cache: KVCache) -> Tensor:
        sa = self.attention.self
        k, v = sa.project_kv(x)
        if cache.self_k is not None:
            k = torch.cat([cache.self_k, k], dim=2)
            v = torch.cat([cache.self_v, v], dim=2)
        cache.self_k, cache.self_v = k, v
        x = self.attention.output(sa.attend(sa.split(sa.query(x)), k, v, mask), x)
        ca = self.crossattention
        if cache.cross_k is None:
            cache.cross_k, cache.cross_v = ca.self.project_kv(memory)
        h = ca.self.attend(ca.self.split(ca.self.query(x)), cache.cross_k, cache.cross_v, memory_mask)
        x = ca.output(h, x)
        return self.ffn(x)


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (all 0) -> LN -> dropout."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, eps: float,
                 dropout: float, pad_token_id: int = 0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, past_len: int = 0) -> Tensor:
        n = input_ids.shape[1]
        if past_len + n > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {past_len + n} exceeds max_positions "
                             f"{self.position_embeddings.num_embeddings}")
        pos = torch.arange(past_len, past_len + n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertLMHead(nn.Module):
    """BERT ``cls.predictions``: dense -> GELU -> LN -> vocab projection (tied to word embeddings) + bias."""

    def __init__(self, hidden: int, vocab_size: int, eps: float, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden, hidden)
        self.transform.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return self.decoder(h) + self.bias


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init (normal 0.02, zero bias, LN = identity) for modules created from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def checkpointed(fn, *args, enabled: bool):
    """Run ``fn(*args)`` under non-reentrant activation checkpointing when enabled and grads are on."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
