"""Image/video-text contrastive loss (ITC) with momentum distillation, feature queues and id-aware positives.

Follows model-spec §4 (ALBEF / mPLUG v1 / Youku-mPLUG formulas) and training-and-ops §3.1 for data parallelism:

* **Queue mode** (``queue_size > 0``): keys are momentum features (no gradient). They are all-gathered in fp32
  with their ids, so the keys are ``[global momentum batch ; queue]`` and local row i's positive sits at column
  ``offset(rank) + i``. Every rank enqueues the same gathered tensor, so queues stay identical without
  broadcasting buffers. At world size 1 this is exactly ALBEF.
* **No-queue mode** (``queue_size == 0``): keys are the online features gathered *with gradient*
  (:func:`~mplug2.objectives.distributed.gather_with_grad`), local queries × global keys (open_clip
  ``local_loss``); after DDP averaging the gradients equal a single process on the global batch.

Targets are ``α·softmax(s_m) + (1−α)·y_hard``; ``y_hard`` is one-hot, or, when ``ids`` and/or ``text_ids`` are
given, uniform over every key that shares the query's item id *or* its caption (:func:`caption_ids`): a clip
and a caption written for another clip with the very same words are a match, not a negative (the queue keeps
both ids too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.objectives.distributed import gather_no_grad, gather_sizes, gather_with_grad, rank_and_world

__all__ = ["ITCConfig", "ITCOutput", "ITCHead", "soft_cross_entropy", "contrastive_targets", "caption_ids",
           "same_pair"]

log = logging.getLogger(__name__)

_NO_ID = -1  # id of queue slots that have never been filled / of samples without an id


@dataclass
class ITCConfig:
    """ITC hyperparameters; defaults are model-spec §2 (Base/Large)."""

    width: int = 768            # text/visual width D entering the projections
    embed_dim: int = 256
    queue_size: int = 65536     # 0 disables the queue (online keys gathered with gradient)
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    queue_seed: int = 0         # queues start as the same random unit vectors on every rank

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.width <= 0:
            raise ValueError("ITC width and embed_dim must be positive")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError(f"temp {self.temp} outside [{self.temp_min}, {self.temp_max}]")


@dataclass
class ITCOutput:
    loss: Tensor            # scalar
    sim_i2t: Tensor         # (B, K) local queries x keys, divided by temperature
    sim_t2i: Tensor
    local_i2t: Tensor       # (B, B) detached block of this rank's own pairs (for ITM hard negatives)
    local_t2i: Tensor
    targets_i2t: Tensor     # (B, K), rows sum to 1
    targets_t2i: Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``−Σ_j targets·log softmax(logits)`` (fp32)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


_HASH_WEIGHTS: dict[str, Tensor] = {}


def caption_ids(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) non-negative 62-bit id per caption: equal exactly when the token sequences are equal (up to a
    hash collision, ~B²/2⁶² per batch), whatever the padded length of the batch. Computed from what the model
    reads, on its device, so it holds whatever the loader did to the text (a flipped clip's swapped
    "left"/"right" included)."""
    length, dev = input_ids.shape[1], str(input_ids.device)
    if dev not in _HASH_WEIGHTS or _HASH_WEIGHTS[dev].numel() < length:
        g = torch.Generator().manual_seed(0x6D706C7567)      # one fixed table: position p has one weight
        table = torch.randint(1, 2**62, (max(1024, length),), generator=g, dtype=torch.long)
        _HASH_WEIGHTS[dev] = table.to(input_ids.device)
    tokens = input_ids.long() * attention_mask.long() + attention_mask.long()   # pads hash apart from token 0
    return (tokens * _HASH_WEIGHTS[dev][:length]).sum(1) & (2**62 - 1)          # int64 wraps: deterministic


def same_pair(query_ids: Tensor | None, key_ids: Tensor | None, query_text_ids: Tensor | None = None,
              key_text_ids: Tensor | None = None) -> Tensor | None:
    """(Q, K) bool: the query's image/video and the key's text describe the same thing (same item id or the
    same caption); ``None`` when neither id is known (then only the diagonal pair matches)."""
    match = None
    for q, k in ((query_ids, key_ids), (query_text_ids, key_text_ids)):
        if q is not None and k is not None:
            m = (q.view(-1, 1) == k.view(1, -1)) & (k.view(1, -1) != _NO_ID)
            match = m if match is None else match | m
    return match


def contrastive_targets(n_query: int, n_keys: int, offset: int, query_ids: Tensor | None,
                        key_ids: Tensor | None, device: torch.device, query_text_ids: Tensor | None = None,
                        key_text_ids: Tensor | None = None) -> Tensor:
    """Hard targets: one-hot at ``offset + i``, or uniform over keys sharing the query's id or caption."""
    pos = same_pair(query_ids, key_ids, query_text_ids, key_text_ids)
    if pos is None:
        t = torch.zeros(n_query, n_keys, device=device)
        t[torch.arange(n_query, device=device), offset + torch.arange(n_query, device=device)] = 1.0
        return t
    pos = pos.float()
    counts = pos.sum(1, keepdim=True)
    if bool((counts == 0).any()):
        raise RuntimeError("ITC: a query has no positive key (its own pair must be among the keys)")
    return pos / counts


class ITCHead(nn.Module):
    """Projections W_v/W_t, the learnable temperature, the queues and the ITC loss.

    Momentum projections are twins of :attr:`vision_proj`/:attr:`text_proj` owned by the caller
    (see :class:`~mplug2.objectives.momentum.MomentumPairs`); :meth:`forward` takes unit-norm features.
    """

    def __init__(self, cfg: ITCConfig, global_batch: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        q = cfg.queue_size
        if q > 0:
            g = torch.Generator().manual_seed(cfg.queue_seed)
            self.register_buffer("vision_queue", F.normalize(torch.randn(q, cfg.embed_dim, generator=g), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(q, cfg.embed_dim, generator=g), dim=1))
            self.register_buffer("idx_queue", torch.full((q,), _NO_ID, dtype=torch.long))
            self.register_buffer("text_idx_queue", torch.full((q,), _NO_ID, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        if global_batch is not None:
            self.check_global_batch(global_batch)

    @property
    def use_queue(self) -> bool:
        return self.cfg.queue_size > 0

    def check_global_batch(self, global_batch: int) -> None:
        """Fail at start-up when the queue cannot hold a whole number of global batches."""
        if global_batch <= 0:
            raise ValueError(f"global batch must be positive, got {global_batch}")
        if self.use_queue and self.cfg.queue_size % global_batch != 0:
            raise ValueError(
                f"ITC queue_size={self.cfg.queue_size} is not a multiple of the global batch {global_batch} "
                "(micro-batch x world size): the queue pointer would split a batch. Pick a queue size that "
                "divides evenly, or set queue_size=0.")

    def embed_vision(self, cls_state: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(cls_state), dim=-1)

    def embed_text(self, cls_state: Tensor) -> Tensor:
        return F.normalize(self.text_proj(cls_state), dim=-1)

    def forward(self, f_v: Tensor, f_t: Tensor, f_v_m: Tensor | None = None, f_t_m: Tensor | None = None,
                ids: Tensor | None = None, alpha: float = 0.0, text_ids: Tensor | None = None) -> ITCOutput:
        """ITC on unit-norm online features ``f_v, f_t`` (B, E) and momentum twins ``f_*_m``.

        ``ids`` (B,) item ids and ``text_ids`` (B,) caption ids (:func:`caption_ids`) switch on id-aware
        positives, across ranks and through the queue. ``alpha`` > 0 needs momentum features.
        Enqueues (training mode, queue mode) after computing the loss.
        """
        if f_v.shape != f_t.shape or f_v.dim() != 2:
            raise ValueError(f"ITC expects matching (B, E) features, got {tuple(f_v.shape)} and {tuple(f_t.shape)}")
        has_m = f_v_m is not None and f_t_m is not None
        if self.use_queue and not has_m:
            raise ValueError("ITC queue mode needs momentum features (f_v_m, f_t_m)")
        if alpha > 0 and not has_m:
            raise ValueError("ITC distillation (alpha > 0) needs momentum features")
        with torch.no_grad():
            self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)
        temp = self.temp.float()
        f_v, f_t = f_v.float(), f_t.float()
        b = f_v.shape[0]
        for name, t in (("ids", ids), ("text_ids", text_ids)):
            if t is not None and bool((t < 0).any()):
                raise ValueError(f"ITC {name} must be >= 0 (negative ids mark empty queue slots)")
        rank, _ = rank_and_world()
        sizes = gather_sizes(b, f_v.device)
        offset = sum(sizes[:rank])
        gids = gather_no_grad(ids, sizes) if ids is not None else None
        gtids = gather_no_grad(text_ids, sizes) if text_ids is not None else None

        if self.use_queue:
            with torch.no_grad():
                gv_m = gather_no_grad(f_v_m.float(), sizes)
                gt_m = gather_no_grad(f_t_m.float(), sizes)
                keys_v = torch.cat([gv_m, self.vision_queue.clone()], 0)
                keys_t = torch.cat([gt_m, self.text_queue.clone()], 0)
                key_ids = torch.cat([gids, self.idx_queue.clone()], 0) if gids is not None else None
                key_tids = torch.cat([gtids, self.text_idx_queue.clone()], 0) if gtids is not None else None
            keys_v_grad, keys_t_grad = keys_v, keys_t
        else:
            keys_v_grad = gather_with_grad(f_v)
            keys_t_grad = gather_with_grad(f_t)
            key_ids, key_tids = gids, gtids
            if has_m:
                with torch.no_grad():
                    keys_v = gather_no_grad(f_v_m.float(), sizes)
                    keys_t = gather_no_grad(f_t_m.float(), sizes)

        sim_i2t = f_v @ keys_t_grad.t() / temp
        sim_t2i = f_t @ keys_v_grad.t() / temp
        with torch.no_grad():
            hard = contrastive_targets(b, sim_i2t.shape[1], offset, ids, key_ids, f_v.device, text_ids, key_tids)
            if alpha > 0:
                t_det = temp.detach()
                s_m_i2t = f_v_m.float() @ keys_t.t() / t_det
                s_m_t2i = f_t_m.float() @ keys_v.t() / t_det
                targets_i2t = alpha * F.softmax(s_m_i2t, dim=1) + (1 - alpha) * hard
                targets_t2i = alpha * F.softmax(s_m_t2i, dim=1) + (1 - alpha) * hard
            else:
                targets_i2t = targets_t2i = hard
        loss = 0.5 * (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i))

        if self.use_queue and self.training:
            self._enqueue(gv_m, gt_m, gids, gtids)
        return ITCOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i,
                         local_i2t=sim_i2t[:, offset:offset + b].detach(),
                         local_t2i=sim_t2i[:, offset:offset + b].detach(),
                         targets_i2t=targets_i2t, targets_t2i=targets_t2i)

    @torch.no_grad()
    def _enqueue(self, f_v: Tensor, f_t: Tensor, ids: Tensor | None, text_ids: Tensor | None = None) -> None:
        n = f_v.shape[0]
        q = self.cfg.queue_size
        if q % n != 0:
            raise RuntimeError(f"ITC queue_size={q} is not a multiple of the gathered batch {n}")
        ptr = int(self.queue_ptr)
        self.vision_queue[ptr:ptr + n] = f_v.to(self.vision_queue.dtype)
        self.text_queue[ptr:ptr + n] = f_t.to(self.text_queue.dtype)
        self.idx_queue[ptr:ptr + n] = ids if ids is not None else _NO_ID
        self.text_idx_queue[ptr:ptr + n] = text_ids if text_ids is not None else _NO_ID
        self.queue_ptr.fill_((ptr + n) % q)
