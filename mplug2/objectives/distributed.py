"""Collectives for contrastive losses across data-parallel ranks.

Plain ``dist.all_gather`` returns tensors without autograd history: the gradient that *other* ranks' queries
send to this rank's keys is silently dropped, and DDP averaging no longer equals the single-process loss.
:func:`gather_with_grad` fixes that with an ``autograd.Function`` whose backward all-reduces the incoming
gradient and returns this rank's slice (open_clip ``gather_with_grad``; works on gloo, which lacks the
reduce-scatter that ``torch.distributed.nn.functional.all_gather`` needs on some backends).

Local batch sizes may differ across ranks (last eval batch): every gather first exchanges the sizes and pads.
Outside an initialised process group every function is the identity, so single-process code needs no branch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank_and_world", "gather_sizes", "gather_no_grad", "gather_with_grad",
           "GatherWithGrad"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """The leading-dimension size of every rank's tensor, in rank order."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _all_gather_cat(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 (padding to the largest size for the collective)."""
    longest = max(sizes)
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], 0)
    bufs = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(bufs, x.contiguous())
    return torch.cat([b[:n] for b, n in zip(bufs, sizes)], 0)


def gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, detached (for momentum keys, ids, eval features).

    ``sizes`` (from :func:`gather_sizes`) saves one collective when several tensors share a batch.
    """
    x = x.detach()
    if not is_distributed():
        return x
    return _all_gather_cat(x, sizes if sizes is not None else gather_sizes(x.shape[0], x.device))


class GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: sum the gradient over ranks, return the local rows.

    Rank r's loss depends on every rank's keys; the gradient of the *sum* of rank losses with respect to
    this rank's rows is the all-reduced gradient restricted to them. After DDP divides by the world size,
    parameter gradients equal those of the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        sizes = gather_sizes(x.shape[0], x.device)
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.n = x.shape[0]
        return _all_gather_cat(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.start + ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, with gradients flowing back to every rank's rows."""
    if not is_distributed():
        return x
    return GatherWithGrad.apply(x)
