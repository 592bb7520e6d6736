"""Decoding for the shared decoder: beam search with the GNMT length penalty, and greedy search.

Follows the release ``TextGenerator`` (model-spec 3.5): scores are ``sum log p / ((5 + len) / 6) ** alpha``, EOS is
blocked before ``min_length`` generated tokens, a sample stops when its *top* beam ends, and the best finished
hypothesis wins. Unlike the release, self-attention K/V are cached and cross-attention K/V computed once
(``use_cache=True``); ``use_cache=False`` recomputes the prefix every step and must give the same result.
``allowed_token_ids`` restricts every step to a vocabulary subset (grounding's box tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug2.models.attention import additive_mask
from mplug2.models.decoder import TextDecoder


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # per sample: generated ids after the prompt, EOS removed
    scores: list[float]         # per sample: length-normalised log-probability of the returned sequence


def gnmt_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


class _Stepper:
    """Produces last-position logits for the alive sequences, with or without a KV cache."""

    def __init__(self, decoder: TextDecoder, memory: Tensor, memory_mask: Tensor, use_cache: bool):
        self.decoder, self.use_cache = decoder, use_cache
        self.memory, self.memory_mask = memory, memory_mask
        self.add_mask = additive_mask(memory_mask, memory.dtype)
        self.cache = decoder.new_cache() if use_cache else None

    def __call__(self, alive: Tensor) -> Tensor:
        if self.use_cache:
            new = alive if self.cache[0].length == 0 else alive[:, -1:]
            return self.decoder.step(new, self.memory, self.add_mask, self.cache)
        return self.decoder.last_logits(alive, self.memory, self.memory_mask)

    def select(self, index: Tensor) -> None:
        """Keep/reorder rows (beams and samples) everywhere state is batched."""
        self.memory = self.memory.index_select(0, index)
        self.memory_mask = self.memory_mask.index_select(0, index)
        self.add_mask = self.add_mask.index_select(0, index)
        if self.cache is not None:
            for c in self.cache:
                c.reorder(index)


def _constrain(log_probs: Tensor, step: int, min_length: int, eos: int, allowed: Tensor | None) -> Tensor:
    if allowed is not None:
        log_probs = log_probs.masked_fill(~allowed, float("-inf"))
    if step < min_length:
        log_probs[:, eos] = float("-inf")
    return log_probs


def _prepare(memory: Tensor, prompt_ids: Tensor | None, bos: int, vocab: int, allowed_token_ids):
    b = memory.shape[0]
    if prompt_ids is None:
        prompt = torch.full((b, 1), bos, dtype=torch.long, device=memory.device)
    else:
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=memory.device)
        if prompt.dim() == 1:
            prompt = prompt[None].expand(b, -1)
        if prompt.shape[0] != b or prompt.shape[1] == 0:
            raise ValueError(f"prompt_ids must be (P,) or (B={b}, P>0), got {tuple(prompt.shape)}")
    allowed = None
    if allowed_token_ids is not None:
        ids = torch.as_tensor(list(allowed_token_ids), dtype=torch.long, device=memory.device)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"allowed_token_ids must be non-empty ids in [0, {vocab})")
        allowed = torch.zeros(vocab, dtype=torch.bool, device=memory.device)
        allowed[ids] = True
    return prompt, allowed


@torch.no_grad()
def greedy_search(decoder: TextDecoder, memory: Tensor, memory_mask: Tensor, *, max_length: int,
                  min_length: int = 0, bos_token_id: int, eos_token_id: int, prompt_ids: Tensor | None = None,
                  use_cache: bool = True, length_penalty: float = 0.6,
                  allowed_token_ids=None) -> GenerationResult:
    """Arg-max decoding; a sample stops at its first EOS (or after ``max_length`` tokens)."""
    vocab = decoder.text_cfg.vocab_size
    prompt, allowed = _prepare(memory, prompt_ids, bos_token_id, vocab, allowed_token_ids)
    b, p = prompt.shape
    step_fn = _Stepper(decoder, memory, memory_mask, use_cache)
    alive = prompt
    total = torch.zeros(b, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    lengths = torch.zeros(b, dtype=torch.long, device=memory.device)
    for step in range(max_length):
        lp = _constrain(F.log_softmax(step_fn(alive).float(), dim=-1), step, min_length, eos_token_id, allowed)
        score, tok = lp.max(dim=-1)
        tok = tok.masked_fill(done, eos_token_id)
        total = total + score.masked_fill(done, 0.0)
        lengths = lengths + (~done).long()
        alive = torch.cat([alive, tok[:, None]], dim=1)
        done = done | tok.eq(eos_token_id)
        if bool(done.all()):
            break
    seqs, scores = [], []
    for i in range(b):
        ids = alive[i, p:].tolist()
        if eos_token_id in ids:
            ids = ids[: ids.index(eos_token_id)]
        seqs.append(ids)
        scores.append(float(total[i]) / gnmt_penalty(int(lengths[i]), length_penalty))
    return GenerationResult(seqs, scores)


@torch.no_grad()
def beam_search(decoder: TextDecoder, memory: Tensor, memory_mask: Tensor, *, num_beams: int, max_length: int,
                min_length: int = 0, length_penalty: float = 0.6, bos_token_id: int, eos_token_id: int,
                prompt_ids: Tensor | None = None, use_cache: bool = True,
                allowed_token_ids=None) -> GenerationResult:
    """GNMT beam search (release ``TextGenerator._fast_translate_batch`` with finished beams frozen)."""
    if num_beams < 1 or max_length < 1:
        raise ValueError(f"num_beams and max_length must be >= 1, got {num_beams}, {max_length}")
    k = num_beams
    vocab = decoder.text_cfg.vocab_size
    prompt, allowed = _prepare(memory, prompt_ids, bos_token_id, vocab, allowed_token_ids)
    b, p = prompt.shape
    dev = memory.device
    rep = torch.arange(b, device=dev).repeat_interleave(k)
    step_fn = _Stepper(decoder, memory.index_select(0, rep), memory_mask.index_select(0, rep), use_cache)
    alive = prompt.index_select(0, rep)
    beam_lp = torch.tensor([0.0] + [float("-inf")] * (k - 1), device=dev).repeat(b)
    batch_offset = list(range(b))
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    results: list[tuple[float, list[int]] | None] = [None] * b
    for step in range(max_length):
        n = len(batch_offset)
        lp = _constrain(F.log_softmax(step_fn(alive).float(), dim=-1), step, min_length, eos_token_id, allowed)
        lp = lp + beam_lp[:, None]
        pen = gnmt_penalty(step + 1, length_penalty)
        top_scores, top_ids = (lp / pen).view(n, k * vocab).topk(k, dim=-1)
        beam_lp = (top_scores * pen).view(-1)
        origin = (top_ids // vocab) + torch.arange(n, device=dev)[:, None] * k
        tok = top_ids % vocab
        select = origin.view(-1)
        alive = torch.cat([alive.index_select(0, select), tok.view(-1, 1)], dim=1)
        step_fn.select(select)
        finished = tok.eq(eos_token_id) & torch.isfinite(top_scores)
        if step + 1 == max_length:
            finished = torch.isfinite(top_scores) | finished
            finished[:, 0] = True
        top_done = finished[:, 0].clone()
        if bool(finished.any()):
            preds = alive.view(n, k, -1)
            for i in range(n):
                bi = batch_offset[i]
                for j in finished[i].nonzero().view(-1).tolist():
                    ids = preds[i, j, p:].tolist()
                    if ids and ids[-1] == eos_token_id:
                        ids = ids[:-1]
                    hyps[bi].append((float(top_scores[i, j]), ids))
                if top_done[i]:
                    results[bi] = max(hyps[bi], key=lambda h: h[0])
            beam_lp = beam_lp.masked_fill(finished.view(-1), float("-inf"))  # finished beams never extend
            keep = (~top_done).nonzero().view(-1)
            if keep.numel() == 0:
                break
            if keep.numel() < n:
                rows = (keep[:, None] * k + torch.arange(k, device=dev)).view(-1)
                alive, beam_lp = alive.index_select(0, rows), beam_lp.index_select(0, rows)
                step_fn.select(rows)
                batch_offset = [batch_offset[i] for i in keep.tolist()]
    out = [r if r is not None else (float("-inf"), []) for r in results]
    return GenerationResult([ids for _, ids in out], [s for s, _ in out])
