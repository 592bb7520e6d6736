"""Prefix language modelling: split a caption into a prefix (encoder side) and a target (decoder side).

No public file says how mPLUG-2 picks the split point; the project decision (model-spec §4) is a uniformly
random *word* boundary such that both parts keep at least one word. Word boundaries come from WordPiece:
a token whose string starts with ``##`` continues the previous word. A caption of one word cannot be split;
its prefix is empty ([CLS] [SEP]) and the whole caption is the target (documented fallback, never a crash).

:func:`pack_targets` builds decoder inputs shared with captioning: ``[CLS] prompt target [SEP]`` with labels
−100 on the prompt and padding (the decoder shifts logits internally, so label 0 = [CLS] is never scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mplug2.objectives.mlm import IGNORE_INDEX

__all__ = ["PrefixSplit", "PrefixSplitter", "pack_targets", "pack_sequences"]


@dataclass
class PrefixSplit:
    prefix_ids: Tensor      # (B, Lp) [CLS] prefix [SEP] pad...
    prefix_mask: Tensor
    target_ids: Tensor      # (B, Lt) [CLS] prompt target [SEP] pad...
    target_mask: Tensor
    target_labels: Tensor   # target_ids with −100 on [CLS], prompt and pads
    split_words: Tensor     # (B,) number of words kept in the prefix (0 = fallback)


def pack_sequences(seqs: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors into ``(ids, mask)``."""
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def pack_targets(targets: Sequence[Tensor], cls_id: int, sep_id: int, pad_id: int,
                 prompt: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Decoder ``(ids, mask, labels)`` for ``[CLS] prompt target [SEP]``; prompt/pad/[CLS] labels are −100."""
    prompt = prompt if prompt is not None else torch.zeros(0, dtype=torch.long)
    head = torch.cat([torch.tensor([cls_id]), prompt.long().cpu()])
    seqs = [torch.cat([head, t.long().cpu(), torch.tensor([sep_id])]) for t in targets]
    ids, mask = pack_sequences(seqs, pad_id)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :len(head)] = IGNORE_INDEX
    return ids, mask, labels


class PrefixSplitter:
    """Splits tokenised captions at random word boundaries (needs to know which ids continue a word)."""

    def __init__(self, is_continuation: Tensor, cls_id: int, sep_id: int, pad_id: int) -> None:
        self.is_continuation = is_continuation.bool().cpu()
        self.cls_id, self.sep_id, self.pad_id = int(cls_id), int(sep_id), int(pad_id)

    @classmethod
    def from_tokenizer(cls, tok) -> "PrefixSplitter":
        """From a tokenizer with ``vocab_size`` and ``convert_ids_to_tokens`` (or ``get_vocab``)."""
        n = int(tok.vocab_size)
        flags = torch.zeros(n, dtype=torch.bool)
        inner = getattr(tok, "hf", tok)  # mplug2.tokenizer.Tokenizer wraps a transformers tokenizer as .hf
        if hasattr(inner, "get_vocab"):
            for piece, i in inner.get_vocab().items():
                if i < n and piece.startswith("##"):
                    flags[i] = True
        else:
            for i, piece in enumerate(inner.convert_ids_to_tokens(list(range(n)))):
                flags[i] = piece.startswith("##")
        return cls(flags, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)

    def content(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The caption's tokens without [CLS], [SEP] and padding."""
        keep = mask.bool() & (ids != self.cls_id) & (ids != self.sep_id) & (ids != self.pad_id)
        return ids[keep]

    def word_starts(self, tokens: Tensor) -> Tensor:
        """Positions in ``tokens`` that start a word (the first token always does)."""
        cont = self.is_continuation[tokens.clamp(max=len(self.is_continuation) - 1)]
        if len(tokens):
            cont[0] = False
        return (~cont).nonzero().flatten()

    def split(self, input_ids: Tensor, attention_mask: Tensor, prompt: Tensor | None = None,
              generator: torch.Generator | None = None) -> PrefixSplit:
        """Split every row of a tokenised batch; outputs live on ``input_ids.device``."""
        dev = input_ids.device
        ids_c, mask_c = input_ids.cpu(), attention_mask.cpu()
        prefixes, targets, kept = [], [], []
        for row, m in zip(ids_c, mask_c):
            tokens = self.content(row, m)
            starts = self.word_starts(tokens)
            if len(starts) >= 2:
                j = int(torch.randint(1, len(starts), (1,), generator=generator))
                cut = int(starts[j])
                kept.append(j)
            else:
                cut = 0
                kept.append(0)
            prefixes.append(torch.cat([torch.tensor([self.cls_id]), tokens[:cut], torch.tensor([self.sep_id])]))
            targets.append(tokens[cut:])
        p_ids, p_mask = pack_sequences(prefixes, self.pad_id)
        t_ids, t_mask, t_labels = pack_targets(targets, self.cls_id, self.sep_id, self.pad_id, prompt)
        return PrefixSplit(p_ids.to(dev), p_mask.to(dev), t_ids.to(dev), t_mask.to(dev), t_labels.to(dev),
                           torch.tensor(kept, dtype=torch.long, device=dev))
