"""Visual grounding as box-token generation (mPLUG v1 ``model_grounding_mplug.py``, model-spec §5).

A box (x, y, w, h in pixels of the ``image_res`` input) becomes a prefix token followed by 4 tokens, each
coordinate quantised into ``image_res + 1`` bins (``[unused339]`` then ``[unused340]``… in the BERT vocab; the
tiny vocab uses ``[unused8]`` / ``[unused9]``…; both are config fields). The decoder cross-attends to
[V_f ; T_f] of the referring expression. Training loss per sample = token CE × clamp(L1 error in bins, 0, 5)
× (1 − GIoU), with the box read from the teacher-forced arg-max over box tokens and both factors detached
(so samples already decoded correctly stop pulling). Decoding is greedy for 4 steps over box tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.mlm import IGNORE_INDEX

__all__ = ["GroundingConfig", "BoxCodec", "Grounder", "BoxRegressor", "GroundingTask", "HEADS", "box_iou", "generalized_iou",
           "xywh_to_xyxy", "best_constant_box_accuracy"]


@dataclass
class GroundingConfig:
    prefix_token: str = "[unused339]"
    first_bin_token: str = "[unused340]"
    num_bins: int | None = None      # None -> image_res + 1
    l1_clamp: float = 5.0
    weighted: bool = True            # the release's CE x L1 x (1 - GIoU); False: plain CE over the box tokens

    @classmethod
    def tiny(cls) -> "GroundingConfig":
        """Token layout of the tiny vocabulary (``mplug2.tokenizer.tiny_vocab``)."""
        return cls(prefix_token="[unused8]", first_bin_token="[unused9]")


def xywh_to_xyxy(b: Tensor) -> Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], -1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of (N, 4) xyxy boxes."""
    lt, rb = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)   # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def best_constant_box_accuracy(gold: Tensor, threshold: float = 0.5, max_candidates: int = 1024) -> float:
    """Chance for acc@IoU: the best share of ``gold`` (N, 4 xyxy) that one fixed box reaches IoU >= threshold
    with, the box picked (knowing the answers) among the gold boxes themselves and their mean: a model that
    ignores the image and the expression cannot do better than such a box by much."""
    cands = torch.cat([gold[:max_candidates], gold.mean(0, keepdim=True)])
    iou = box_iou(cands[:, None, :], gold[None, :, :])                 # (C, N)
    return float((iou >= threshold).float().mean(1).max())


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise GIoU of (N, 4) xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-6)


class BoxCodec:
    """Box ↔ token ids. Bin i covers coordinate ``i · image_res / (num_bins − 1)``."""

    def __init__(self, prefix_id: int, first_bin_id: int, num_bins: int, image_res: int) -> None:
        if num_bins < 2:
            raise ValueError("num_bins must be >= 2")
        self.prefix_id, self.first_bin_id, self.num_bins, self.image_res = prefix_id, first_bin_id, num_bins, image_res
        self.step = image_res / (num_bins - 1)

    @classmethod
    def from_tokenizer(cls, tok, cfg: GroundingConfig, image_res: int) -> "BoxCodec":
        n = cfg.num_bins or image_res + 1
        prefix = tok.convert_tokens_to_ids(cfg.prefix_token)
        first = tok.convert_tokens_to_ids(cfg.first_bin_token)
        ids = [first + i for i in range(n)]
        if prefix == tok.unk_token_id or first == tok.unk_token_id or ids[-1] >= tok.vocab_size:
            raise ValueError(f"vocabulary lacks the grounding tokens {cfg.prefix_token}/{cfg.first_bin_token} "
                             f"+ {n} bins")
        names = tok.convert_ids_to_tokens(ids)
        if len(set(names)) != n or any(not t.startswith("[unused") for t in names):
            raise ValueError(f"the {n} box-bin ids after {cfg.first_bin_token} are not contiguous [unusedN] tokens")
        return cls(prefix, first, n, image_res)

    @property
    def bin_ids(self) -> list[int]:
        return list(range(self.first_bin_id, self.first_bin_id + self.num_bins))

    def encode(self, boxes: Tensor) -> Tensor:
        """(B, 4) xywh pixels -> (B, 4) token ids."""
        bins = torch.round(boxes.float() / self.step).long().clamp(0, self.num_bins - 1)
        return bins + self.first_bin_id

    def decode(self, ids: Tensor) -> Tensor:
        """(B, 4) token ids -> (B, 4) xywh pixels (bin centres)."""
        return (ids.long() - self.first_bin_id).clamp(0, self.num_bins - 1).float() * self.step


class Grounder(nn.Module):
    """Batch: ``{"pixels", "input_ids", "attention_mask"`` (referring expressions), ``"boxes"`` (B, 4) xywh}``."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: GroundingConfig | None = None) -> None:
        super().__init__()
        self.model, self.tok, self.cfg = model, tokenizer, cfg or GroundingConfig()
        self.codec = BoxCodec.from_tokenizer(tokenizer, self.cfg, model.config.vision.image_res)

    def memory(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.fused_memory(pixels, input_ids, attention_mask)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mem, mem_mask = self.memory(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        boxes = batch["boxes"].float()
        b, dev = boxes.shape[0], boxes.device
        head = torch.tensor([self.tok.cls_token_id, self.codec.prefix_id], device=dev).expand(b, 2)
        box_ids = self.codec.encode(boxes)
        ids = torch.cat([head, box_ids], 1)
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX
        out = self.model.decode(ids, torch.ones_like(ids), mem, mem_mask, labels=labels, reduction="none")
        ce = out.loss / 4.0                                          # (B,) mean CE over the 4 box tokens
        with torch.no_grad():
            box_logits = out.logits[:, 1:5, self.codec.first_bin_id:self.codec.first_bin_id + self.codec.num_bins]
            pred = self.codec.decode(box_logits.argmax(-1) + self.codec.first_bin_id)
            l1 = ((pred - self.codec.decode(box_ids)).abs() / self.codec.step).mean(-1).clamp(0, self.cfg.l1_clamp)
            giou = generalized_iou(xywh_to_xyxy(pred), xywh_to_xyxy(boxes))
            weight = l1 * (1 - giou)
        loss = (ce * weight).mean() if self.cfg.weighted else ce.mean()
        return {"loss": loss, "box_ce": ce.mean().detach(), "giou": giou.mean(), "l1_bins": l1.mean()}

    @torch.no_grad()
    def predict(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Greedy decoding over box tokens only -> (B, 4) xywh boxes in pixels."""
        mem, mem_mask = self.memory(pixels, input_ids, attention_mask)
        prompt = torch.tensor([self.tok.cls_token_id, self.codec.prefix_id], device=pixels.device)
        seqs = self.model.generate(mem, mem_mask, num_beams=1, max_length=4, min_length=4, prompt_ids=prompt,
                                   allowed_token_ids=self.codec.bin_ids)
        ids = torch.tensor(seqs, dtype=torch.long, device=pixels.device)
        if ids.shape != (pixels.shape[0], 4):
            raise RuntimeError(f"grounding decoder returned {tuple(ids.shape)} tokens, expected (B, 4)")
        return self.codec.decode(ids)


class BoxRegressor(nn.Module):
    """TransVG / mPLUG v1 ``refcoco`` style box regression: an MLP on the fused [CLS] of the referring
    expression -> sigmoid (cx, cy, w, h) of the image; loss = 5 · L1 + 2 · (1 − GIoU) (DETR's weights).
    Smooth gradients in the box coordinates: on small models and budgets it learns far sooner than box-token
    cross-entropy, where a bin one off costs as much as one across the image."""

    def __init__(self, model: MPLUG2, l1_weight: float = 5.0, giou_weight: float = 2.0) -> None:
        super().__init__()
        self.model, self.l1_weight, self.giou_weight = model, l1_weight, giou_weight
        d = model.config.text.hidden
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 4))

    def boxes(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 4) normalised (x1, y1, x2, y2)."""
        mem, _ = self.model.fused_memory(pixels, input_ids, attention_mask)
        cls = mem[:, mem.shape[1] - input_ids.shape[1]]                       # T_f[:, 0]
        cx, cy, w, h = self.head(cls).float().sigmoid().unbind(-1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pred, gold = self.boxes(batch["pixels"], batch["input_ids"], batch["attention_mask"]), batch["boxes"].float()
        l1 = (_cxcywh(pred) - _cxcywh(gold)).abs().sum(-1).mean()
        giou = generalized_iou(pred, gold)
        loss = self.l1_weight * l1 + self.giou_weight * (1 - giou).mean()
        return {"loss": loss, "l1": l1.detach(), "giou": giou.mean().detach()}


def _cxcywh(b: Tensor) -> Tensor:
    return torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)


HEADS = ("tokens", "regression")


class GroundingTask(nn.Module):
    """Grounding over loader batches, whose ``boxes`` are normalised (x1, y1, x2, y2) of the model input
    (:mod:`mplug2.data.collate`); predictions come back in the same layout. ``head``: ``tokens`` (the spec's
    4 box tokens from the decoder, :class:`Grounder`) or ``regression`` (:class:`BoxRegressor`)."""

    def __init__(self, model: MPLUG2, tokenizer, cfg: GroundingConfig | None = None, head: str = "tokens") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"grounding head must be one of {HEADS}, got {head!r}")
        self.head = head
        self.impl = Grounder(model, tokenizer, cfg) if head == "tokens" else BoxRegressor(model)
        self.res = float(model.config.vision.image_res)

    @property
    def model(self) -> MPLUG2:
        return self.impl.model

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "boxes" not in batch:
            raise ValueError("grounding batches need a box in every sample's json (preprocess with --box-col, "
                             "or --preset refcoco)")
        if self.head == "regression":
            return self.impl(batch)
        x1, y1, x2, y2 = (batch["boxes"].float() * self.res).unbind(-1)
        return self.impl({**batch, "boxes": torch.stack([x1, y1, x2 - x1, y2 - y1], -1)})

    @torch.no_grad()
    def predict(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 4) normalised (x1, y1, x2, y2) boxes."""
        if self.head == "regression":
            return self.impl.boxes(pixels, input_ids, attention_mask)
        return xywh_to_xyxy(self.impl.predict(pixels, input_ids, attention_mask)) / self.res
