"""Image/video-text matching (ITM) with hard negatives mined from the ITC similarities (model-spec §4).

Negatives are drawn per rank from the local (B, B) similarity block: the softmax over a row, restricted to
valid candidates (not the positive, not a same-id item, not a clip whose caption is word for word the same), is
the sampling distribution, so harder negatives
(more similar) are drawn more often. Masking with −inf before the softmax is the same distribution as
"softmax, zero the positives, renormalise", but never underflows to an all-zero row.

``random_mix`` (model config ``itm_random_negatives``) blends that distribution with the uniform one over the same
valid candidates: ``(1 - u) · softmax + u · uniform``. Pure hard negatives can be too hard to learn from at the
start: when captions differ by one attribute the hardest negative is a near-identical clip, and a head that cannot
yet tell them apart sits at the "no match" prior; uniform draws give it easy, informative contrasts as well.
Retrieval fine-tuning lowers it (ALBEF / BLIP fine-tune on hard negatives only): uniform negatives teach ITM the
contrasts ITC already ranks right, hard ones the near-identical candidates that ITM re-ranks. A quarter uniform
measured better than none until the reversed clips below; with them, the demo, the learning test and
``configs/retrieval_tiny.yaml`` draw every retrieval negative by similarity (docs/benchmarks.md, issue 14).

``reversed_share`` (model config ``itm_reversed_negatives``) adds the arrow of time: that share of the batch's clips
is also encoded played backwards and paired with its own caption as a non-match (Wei et al., "Learning and Using
the Arrow of Time", CVPR 2018; Bagad et al., "Test of Time", CVPR 2023). A reversed clip has the same objects,
colours and speed, so only motion tells it from the original; in-batch negatives rarely differ in direction
alone (issue 14: ITC and ITM were both at chance on held-out clips that differ only in direction). It is only
right for corpora whose captions state the direction of motion ("moving left", "opens the door"): a caption
that holds both ways ("a dog on a beach") would be taught a false non-match. Off by default; images (T = 1)
are never reversed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ITMOutput", "ITMHead", "sample_hard_negatives", "itm_loss", "reversed_clip_logits", "FuseFn",
           "EncodeVisionFn"]

FuseFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (text, tmask, vis, vmask) -> (V_f, T_f)
EncodeVisionFn = Callable[[Tensor], tuple[Tensor, Tensor]]                  # pixels -> (V, V_mask)


@dataclass
class ITMOutput:
    loss: Tensor
    logits: Tensor      # (3B, 2)
    labels: Tensor      # (3B,) = [1]*B + [0]*2B
    neg_text_for_image: Tensor   # (B,) index of the negative text paired with image i
    neg_image_for_text: Tensor   # (B,) index of the negative image paired with text i


class ITMHead(nn.Module):
    """Linear(D, 2) on the fusion [CLS] state: logit 1 = "matched"."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, fused_text: Tensor) -> Tensor:
        return self.fc(fused_text[:, 0])


def _valid_mask(b: int, ids: Tensor | None, device: torch.device, text_ids: Tensor | None = None) -> Tensor:
    """(B, B): pair (i, j) may serve as a negative — neither the same item nor the same caption."""
    valid = ~torch.eye(b, dtype=torch.bool, device=device)
    for t in (ids, text_ids):
        if t is not None:
            valid &= t.view(-1, 1) != t.view(1, -1)
    return valid


@torch.no_grad()
def sample_hard_negatives(local_i2t: Tensor, local_t2i: Tensor, ids: Tensor | None = None,
                          generator: torch.Generator | None = None,
                          text_ids: Tensor | None = None, random_mix: float = 0.0) -> tuple[Tensor, Tensor]:
    """Draw one negative text per image and one negative image per text.

    ``local_i2t[i, j]`` is the similarity of image i with text j on this rank. Returns
    ``(neg_text_for_image, neg_image_for_text)``, each (B,) long. ``ids`` / ``text_ids`` (B,) exclude items
    with the same id or the same caption (:func:`~mplug2.objectives.itc.caption_ids`). ``random_mix`` in [0, 1] is
    the share of uniformly drawn (instead of similarity-weighted) negatives. Raises ``ValueError``
    when a row has no valid negative (batch of one, or every item sharing the row's id or caption).
    """
    b = local_i2t.shape[0]
    if local_i2t.shape != (b, b) or local_t2i.shape != (b, b):
        raise ValueError(f"ITM needs square local similarity blocks, got {tuple(local_i2t.shape)}")
    valid = _valid_mask(b, ids, local_i2t.device, text_ids)
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"ITM: rows {rows} have no valid negative in the local batch of {b} "
            "(every other item is the positive or shares its id or caption); use a larger or more diverse batch")
    return _draw(local_i2t, local_t2i, valid, generator, random_mix)


def _draw(local_i2t: Tensor, local_t2i: Tensor, valid: Tensor,
          generator: torch.Generator | None, random_mix: float = 0.0) -> tuple[Tensor, Tensor]:
    if not 0.0 <= random_mix <= 1.0:
        raise ValueError(f"ITM random_mix must be in [0, 1], got {random_mix}")
    neg = float("-inf")
    uniform = valid.float() / valid.sum(dim=1, keepdim=True).clamp(min=1)
    w_i2t = F.softmax(local_i2t.float().masked_fill(~valid, neg), dim=1).lerp(uniform, random_mix)
    w_t2i = F.softmax(local_t2i.float().masked_fill(~valid, neg), dim=1).lerp(uniform, random_mix)
    neg_text_for_image = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    neg_image_for_text = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_text_for_image, neg_image_for_text


def itm_loss(fuse: FuseFn, head: ITMHead, vis: Tensor, vis_mask: Tensor, text: Tensor, text_mask: Tensor,
             local_i2t: Tensor, local_t2i: Tensor, ids: Tensor | None = None,
             generator: torch.Generator | None = None, text_ids: Tensor | None = None,
             random_mix: float = 0.0) -> ITMOutput:
    """B positives plus 2B hard negatives through ``fuse`` in one call; CE on the ITM head.

    A row with no valid negative (every other item of the local batch is the same sample or has the same
    caption: e.g. a batch whose damaged samples were filled with repeats of the one readable sample) pairs
    with itself and its negatives weigh nothing, so one such batch never stops a run; its positive still counts.
    """
    b = vis.shape[0]
    if local_i2t.shape != (b, b) or local_t2i.shape != (b, b):
        raise ValueError(f"ITM needs square local similarity blocks, got {tuple(local_i2t.shape)}")
    valid = _valid_mask(b, ids, local_i2t.device, text_ids)
    has_neg = valid.any(dim=1)
    if bool(has_neg.all()):
        neg_t, neg_v = _draw(local_i2t, local_t2i, valid, generator, random_mix)
    else:
        neg_t, neg_v = _draw(local_i2t, local_t2i, valid | torch.diag_embed(~has_neg), generator, random_mix)
    vis_all = torch.cat([vis, vis[neg_v], vis], 0)
    vmask_all = torch.cat([vis_mask, vis_mask[neg_v], vis_mask], 0)
    text_all = torch.cat([text, text, text[neg_t]], 0)
    tmask_all = torch.cat([text_mask, text_mask, text_mask[neg_t]], 0)
    _, fused_text = fuse(text_all, tmask_all, vis_all, vmask_all)
    logits = head(fused_text).float()
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(vis.device)
    if bool(has_neg.all()):
        loss = F.cross_entropy(logits, labels)
    else:
        w = torch.cat([torch.ones(b, device=vis.device), has_neg.float(), has_neg.float()])
        loss = (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum()
    return ITMOutput(loss=loss, logits=logits, labels=labels, neg_text_for_image=neg_t, neg_image_for_text=neg_v)


def reversed_clip_logits(encode_vision: EncodeVisionFn, fuse: FuseFn, head: ITMHead, pixels: Tensor, text: Tensor,
                         text_mask: Tensor, share: float) -> Tensor | None:
    """ITM logits ``(n, 2)`` of the first ``n = round(share * B)`` clips played backwards (time axis of
    ``pixels`` (B, 3, T, H, W) flipped), each fused with its own caption: non-matches (label 0) for the ITM
    loss. ``None`` when there are none to add: ``share`` rounds to 0 or the batch holds images (T = 1). The
    loader shuffles, so the first rows are a random draw; the reversed clips go through the vision encoder
    with gradient, which is where direction is learned (the temporal modules)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"ITM reversed share must be in [0, 1], got {share}")
    n = round(share * pixels.shape[0])
    if n == 0 or pixels.shape[2] < 2:
        return None
    vis, vis_mask = encode_vision(pixels[:n].flip(2))
    _, fused = fuse(text[:n], text_mask[:n], vis, vis_mask)
    return head(fused).float()
