"""Momentum (EMA) twins for ITC distillation, MLM soft targets and prefix-LM distillation.

A twin is a deep copy of an online module whose parameters never require gradients (so DDP ignores them
and no optimizer ever sees them). ``θ_m ← m·θ_m + (1−m)·θ`` runs under ``no_grad`` once per *optimizer*
step: per micro-batch it would compound to m^k under gradient accumulation (training-and-ops §3.2).
The update is one fused ``torch._foreach_lerp_`` over all tensors; it is local, so DDP (identical online
weights on every rank) keeps twins identical without communication, and FSDP2 shards update shard-locally.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["make_momentum_twin", "momentum_update", "MomentumPairs"]

log = logging.getLogger(__name__)


def make_momentum_twin(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` on every parameter.

    Tied weights stay tied inside the copy (``deepcopy`` keeps the sharing), so the twin's parameter list
    lines up one-to-one with the online module's.
    """
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _paired_tensors(online: nn.Module, twin: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    on = list(online.named_parameters())
    tw = list(twin.named_parameters())
    if [n for n, _ in on] != [n for n, _ in tw]:
        raise ValueError("momentum twin does not mirror its online module (parameter names differ)")
    for (name, a), (_, b) in zip(on, tw):
        if a.shape != b.shape:
            raise ValueError(f"momentum twin parameter {name}: shape {tuple(b.shape)} != online {tuple(a.shape)}")
    return [p.data for _, p in tw], [p.data for _, p in on]


@torch.no_grad()
def momentum_update(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """EMA every ``(online, twin)`` pair in place: ``twin ← momentum·twin + (1−momentum)·online``.

    ``momentum=0`` copies the online weights exactly; ``momentum=1`` leaves the twin untouched.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    twins: list[torch.Tensor] = []
    onlines: list[torch.Tensor] = []
    for online, twin in pairs:
        t, o = _paired_tensors(online, twin)
        twins += t
        onlines += o
    if not twins or momentum == 1.0:
        return
    # Group by dtype/device: _foreach ops need homogeneous lists.
    groups: dict[tuple[torch.dtype, torch.device], tuple[list, list]] = {}
    for t, o in zip(twins, onlines):
        g = groups.setdefault((t.dtype, t.device), ([], []))
        g[0].append(t)
        g[1].append(o.to(t.dtype))
    for ts, os_ in groups.values():
        torch._foreach_lerp_(ts, os_, 1.0 - momentum)


class MomentumPairs(nn.Module):
    """Owns the momentum twins of a set of named online modules and updates them together.

    ``pairs = MomentumPairs({"model": model, "vision_proj": vproj}, momentum=0.995)`` creates
    ``pairs.twins["model"]`` etc.; call :meth:`update` once per optimizer step. The online modules are
    referenced, not registered, so their parameters are not counted twice in ``state_dict``.
    """

    def __init__(self, online: dict[str, nn.Module], momentum: float) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self._online = dict(online)  # plain dict: not registered as submodules
        self.twins = nn.ModuleDict({k: make_momentum_twin(m) for k, m in online.items()})
        n = sum(p.numel() for p in self.twins.parameters())
        log.info("momentum twins for %s: %.2fM parameters, m=%s", list(online), n / 1e6, momentum)

    def __getitem__(self, key: str) -> nn.Module:
        return self.twins[key]

    def update(self, momentum: float | None = None) -> None:
        """One EMA step over every pair (``momentum`` overrides the configured value)."""
        m = self.momentum if momentum is None else momentum
        momentum_update([(self._online[k], self.twins[k]) for k in self.twins], m)
