"""Video/image question answering (model-spec §3.5, §5): vision → universal → text → fusion → decoder on [V_f ; T_f].

Training follows the release ``BertLMHeadModel``: each answer's token CE is *summed* per sequence, weighted, and
``Σ_i w_i·loss_i / B``. A question may have several answers (``answer_index`` maps each answer to its question;
the memory is repeated once per answer). Inference: beam generation (the release default) or
:meth:`VideoQA.rank_answer` over a fixed answer list (first-token top-k, then full-sequence log-likelihood,
softmax over the k candidates), off by default as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.mlm import IGNORE_INDEX

__all__ = ["QAConfig", "RankedAnswers", "VideoQA", "QATask"]


@dataclass
class QAConfig:
    num_beams: int | None = None
    max_length: int | None = None    # None -> model config max_answer_len
    min_length: int = 1
    k_test: int = 128                # rank_answer candidates kept after the first-token pass


@dataclass
class RankedAnswers:
    best: Tensor        # (B,) index into the answer list
    candidates: Tensor  # (B, k) answer-list indices, first-token top-k
    probs: Tensor       # (B, k) softmax of the candidates' sequence log-likelihoods


def answer_labels(answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Answer ids with pads (and the leading [CLS], never scored after the shift) set to −100."""
    labels = answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return labels


class VideoQA(nn.Module):
    """Batch: ``{"pixels", "input_ids", "attention_mask"`` (questions), ``"answer_ids", "answer_mask"``
    (answers, [CLS] ... [SEP]), optional ``"answer_index"`` (N_ans,) and ``"answer_weights"`` (N_ans,)}``."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: QAConfig | None = None) -> None:
        super().__init__()
        self.model, self.tok, self.cfg = model, tokenizer, cfg or QAConfig()

    def memory(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``([V_f ; T_f], mask)`` for each question."""
        return self.model.fused_memory(pixels, input_ids, attention_mask)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mem, mem_mask = self.memory(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        b = mem.shape[0]
        a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
        index = batch.get("answer_index")
        if index is None:
            if a_ids.shape[0] != b:
                raise ValueError(f"{a_ids.shape[0]} answers for {b} questions: pass answer_index")
            index = torch.arange(b, device=a_ids.device)
        weights = batch.get("answer_weights")
        if weights is None:
            weights = torch.ones(a_ids.shape[0], device=mem.device)
        out = self.model.decode(a_ids, a_mask, mem[index], mem_mask[index], labels=answer_labels(a_ids, a_mask),
                                reduction="none")
        loss = (weights.float() * out.loss).sum() / b
        return {"loss": loss, "qa": loss.detach()}

    @torch.no_grad()
    def predict(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        """Beam-generated answers."""
        mem, mem_mask = self.memory(pixels, input_ids, attention_mask)
        max_len = self.cfg.max_length or self.model.config.max_answer_len
        seqs = self.model.generate(mem, mem_mask, num_beams=self.cfg.num_beams, max_length=max_len,
                                   min_length=self.cfg.min_length)
        return [self.tok.decode(s) for s in seqs]

    @torch.no_grad()
    def rank_answer(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                    answer_mask: Tensor, k: int | None = None) -> RankedAnswers:
        """Pick each question's answer from a list (``answer_ids`` (N, La), [CLS] answer [SEP] pads)."""
        mem, mem_mask = self.memory(pixels, input_ids, attention_mask)
        b, n = mem.shape[0], answer_ids.shape[0]
        k = min(k or self.cfg.k_test, n)
        bos = answer_ids[:, :1][:1].expand(b, 1)
        first = self.model.decode(bos, torch.ones_like(bos), mem, mem_mask).logits[:, 0].float()
        first_lp = F.log_softmax(first, dim=-1)[:, answer_ids[:, 1]]          # (B, N)
        _, cand = first_lp.topk(k, dim=1)                                     # (B, k)
        flat = cand.reshape(-1)
        rep = torch.arange(b, device=mem.device).repeat_interleave(k)
        ids, msk = answer_ids[flat], answer_mask[flat]
        nll = self.model.decode(ids, msk, mem[rep], mem_mask[rep], labels=answer_labels(ids, msk),
                                reduction="none").loss.view(b, k)
        probs = F.softmax(-nll, dim=1)
        best = cand.gather(1, probs.argmax(1, keepdim=True)).squeeze(1)
        return RankedAnswers(best=best, candidates=cand, probs=probs)


class QATask(nn.Module):
    """:class:`~mplug2.tasks.qa.VideoQA` over loader batches: questions are the tokenised captions, answers
    (``batch["answers"]``) are tokenised here as ``[CLS] answer [SEP]``."""

    def __init__(self, model: MPLUG2, tokenizer, max_answer_len: int = 10) -> None:
        super().__init__()
        self.qa = VideoQA(model, tokenizer)
        self.tok, self.max_answer_len = tokenizer, max_answer_len

    @property
    def model(self) -> MPLUG2:
        return self.qa.model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        answers = batch.get("answers")
        if answers is None or any(a is None for a in answers):
            raise ValueError("QA batches need an `answer` in every sample's json (see pipelines.synthetic)")
        enc = self.tok(list(answers), max_length=self.max_answer_len + 2)
        dev = batch["input_ids"].device
        return self.qa({**batch, "answer_ids": enc["input_ids"].to(dev), "answer_mask": enc["attention_mask"].to(dev)})

    def predict(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        return self.qa.predict(pixels, input_ids, attention_mask)
