"""Masked language modelling: BERT 80/10/10 masking and the (optionally distilled) MLM loss (model-spec §4).

Selection: each real token is chosen with probability p (0.15), never [PAD] (or any position outside the
attention mask), [CLS] or [SEP]. Of the chosen, 80 % become [MASK], 10 % a random *non-special* token, 10 %
stay. Labels hold the original id at chosen positions and −100 elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskingConfig", "mask_tokens", "mlm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class MaskingConfig:
    """Token ids and rates for :func:`mask_tokens`; build it from the tokenizer (special ids are never guessed)."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]   # [PAD], [CLS], [SEP] (and any other id that must never be masked)
    probability: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"MLM probability must lie in (0, 1), got {self.probability}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1:
            raise ValueError("MLM mask_frac + random_frac must lie in [0, 1]")
        self.special_ids = tuple(int(i) for i in self.special_ids)

    @classmethod
    def from_tokenizer(cls, tok, probability: float = 0.15) -> "MaskingConfig":
        """From a BERT-style tokenizer exposing ``mask/pad/cls/sep_token_id`` and ``vocab_size``."""
        return cls(mask_token_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                   special_ids=(tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id),
                   probability=probability)


def _replacement_pool(vocab_size: int, special_ids: Iterable[int], device: torch.device) -> Tensor:
    keep = torch.ones(vocab_size, dtype=torch.bool, device=device)
    keep[list(special_ids)] = False
    return keep.nonzero().flatten()


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, cfg: MaskingConfig,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(masked_ids, labels)`` for a (B, L) batch; ``input_ids`` is not modified."""
    dev = input_ids.device
    gen_kw = {"generator": generator} if generator is not None else {}

    def rand(shape) -> Tensor:  # draw on CPU when a CPU generator is given, then move
        return torch.rand(shape, **gen_kw).to(dev) if generator is not None else torch.rand(shape, device=dev)

    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for sid in cfg.special_ids:
        special |= input_ids == sid
    maskable = attention_mask.bool() & ~special
    chosen = (rand(input_ids.shape) < cfg.probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    u = rand(input_ids.shape)
    to_mask = chosen & (u < cfg.mask_frac)
    to_random = chosen & (u >= cfg.mask_frac) & (u < cfg.mask_frac + cfg.random_frac)
    masked = input_ids.clone()
    masked[to_mask] = cfg.mask_token_id
    n_rand = int(to_random.sum())
    if n_rand:
        pool = _replacement_pool(cfg.vocab_size, cfg.special_ids, dev)
        pick = (rand((n_rand,)) * len(pool)).long().clamp_(max=len(pool) - 1)
        masked[to_random] = pool[pick]
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor, soft_logits: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Mean over labelled tokens of ``(1−α)·CE + α·softCE(softmax(soft_logits))``; ``logits`` (..., V) and
    ``labels`` (...) may be the whole batch or only its masked positions.

    A batch where no token was selected returns a zero that still depends on ``logits`` (so every
    parameter keeps a gradient and DDP does not stall on unused parameters).
    """
    sel = labels != IGNORE_INDEX
    if not bool(sel.any()):
        return logits.sum() * 0.0
    lg = logits[sel].float()
    loss = F.cross_entropy(lg, labels[sel], reduction="none")
    if soft_logits is not None and alpha > 0:
        soft = F.softmax(soft_logits[sel].float(), dim=-1)
        loss_soft = -(F.log_softmax(lg, dim=-1) * soft).sum(-1)
        loss = (1 - alpha) * loss + alpha * loss_soft
    return loss.mean()
