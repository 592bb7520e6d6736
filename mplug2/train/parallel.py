"""Data-parallel wrapping of a task module: DDP or FSDP2 (``scale.strategy``), and the few places where the
training loop must know which one it runs (accumulation, gradient clipping, autocast, full weights).

DDP (``strategy: ddp``): ``DistributedDataParallel`` with ``broadcast_buffers=False`` (queues and momentum
twins are identical on every rank by construction, training-and-ops §3.2).

FSDP2 (``strategy: fsdp2``): ``torch.distributed.fsdp.fully_shard`` on a 1-D device mesh, one unit per block
(vision blocks, text/universal layers, fusion layers, decoder layers), then the root task module, which
holds what is left (embeddings, heads, projections, ITC temperature). Momentum twins are deep copies of
their online modules, so the same rule finds their blocks and shards them the same way: twin and online
parameters get identical ``Shard(0)`` layouts and the EMA stays a local update of matching shards. Buffers
(ITC queues, pointers) are not sharded: they stay full and identical on every rank, as under DDP.

Sharding units must be entered through ``__call__`` (FSDP2 all-gathers in a forward pre-hook). The fusion
encoder's connected-attention layers call ``layer.attention`` and ``layer.ffn`` directly, so for those
layers the units are the attention, intermediate and output sub-modules instead of the layer. The
decoder's incremental generation path (``forward_cached``) calls projections directly: generation and other
evaluation code run inside :func:`full_weights`, which all-gathers every unit for the duration.

Pure torch; no Ray.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mplug2.train.config import BLOCK_TYPES, STRATEGIES

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "wrap", "is_fsdp", "shard_units", "grad_sync", "clip_grad_norm_", "autocast",
           "full_weights", "full_state_dict", "set_activation_checkpointing", "compile_blocks", "optimizer_impl"]


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` was passed to ``fully_shard`` (FSDP2 changes its class in place)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_units(task: nn.Module) -> list[nn.Module]:
    """The modules that each become one FSDP2 unit, in module order (children before the root is sharded).

    Every vision block, text layer (the universal layers are the text encoder's last two), fusion layer and
    decoder layer, wherever it sits: online model or momentum twin, pretrainer or fine-tuning wrapper.
    """
    from mplug2.models.decoder import TextDecoder
    from mplug2.models.fusion import FusionEncoder
    from mplug2.models.text import TextEncoder
    from mplug2.models.vision import VisionEncoder

    units: list[nn.Module] = []
    seen: set[int] = set()

    def add(m: nn.Module | None) -> None:
        if m is not None and id(m) not in seen:
            seen.add(id(m))
            units.append(m)

    for m in task.modules():
        if isinstance(m, VisionEncoder):
            for blk in m.blocks:
                add(blk)
        elif isinstance(m, (TextEncoder, TextDecoder)):
            for layer in m.layer:
                add(layer)
        elif isinstance(m, FusionEncoder):
            for j, layer in enumerate(m.layer):
                if m.is_connected(j):        # entered as layer.attention(...) and layer.ffn(...), not layer(...)
                    add(layer.attention)
                    add(layer.intermediate)
                    add(layer.output)
                else:
                    add(layer)
    return units


def _encoder_types() -> dict[str, type]:
    from mplug2.models.decoder import TextDecoder
    from mplug2.models.fusion import FusionEncoder
    from mplug2.models.text import TextEncoder
    from mplug2.models.vision import VisionEncoder

    return {"vision": VisionEncoder, "text": TextEncoder, "fusion": FusionEncoder, "decoder": TextDecoder}


def set_activation_checkpointing(task: nn.Module, block_types: list[str] | None) -> dict[str, int]:
    """Recompute the blocks of the listed types in backward, and only those (``scale.activation_checkpointing``;
    None leaves the model config's all-or-nothing setting). Video frames make the vision blocks' activations
    the largest by far, so ``[vision]`` saves most memory for the least recompute. Returns encoders per type
    switched on."""
    if block_types is None:
        return {}
    unknown = set(block_types) - set(BLOCK_TYPES)
    if unknown:
        raise ValueError(f"unknown block types {sorted(unknown)}; choose from {BLOCK_TYPES}")
    counts = dict.fromkeys(BLOCK_TYPES, 0)
    for kind, cls in _encoder_types().items():
        for m in task.modules():
            if isinstance(m, cls):
                m.activation_checkpointing = kind in block_types
                counts[kind] += kind in block_types
    return counts


def compile_blocks(task: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block in place (the FSDP2 units of :func:`shard_units`), as
    torchtitan does: blocks take tensors only, so graphs stay stable whatever the batch dict holds, and
    parameter names (checkpoints) do not change. Call before :func:`wrap`. Returns the number compiled.
    ``backend``: torch.compile's (``aot_eager`` captures the same graphs without generating kernels)."""
    units = shard_units(task)
    for unit in units:
        unit.compile(backend=backend)
    log.info("torch.compile: %d blocks", len(units))
    return len(units)


def optimizer_impl(task: nn.Module) -> dict[str, bool]:
    """AdamW implementation flags: the fused CUDA kernel when the parameters live on a GPU, the multi-tensor
    (foreach) path otherwise."""
    on_cuda = any(p.is_cuda for p in task.parameters())
    return {"fused": True} if on_cuda else {"foreach": True}


def wrap(task: nn.Module, *, strategy: str, device: torch.device, world_size: int, precision: str = "fp32",
         find_unused_parameters: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """The module the loop calls forward on: DDP around ``task``, or ``task`` itself sharded in place (FSDP2).

    A single process without a process group runs ``task`` unwrapped, whatever the strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"scale.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world_size == 1 or not dist.is_initialized():
        return task
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, which still syncs at init;
        # its own warning says to keep broadcast_buffers=False for buffers that must never be broadcast.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return nn.parallel.DistributedDataParallel(
                task, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    if precision == "bf16" and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:   # fp32 runs, and CPU (bf16 there stays with torch.autocast, as under DDP)
        mp = MixedPrecisionPolicy()
    # fully_shard refuses 0-dim parameters (the ITC temperature): they stay replicated plain tensors whose
    # gradients grad_sync all-reduces itself, as DDP would.
    scalars = [p for p in task.parameters() if p.dim() == 0]
    units = shard_units(task)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=set(scalars))
    fully_shard(task, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=set(scalars))
    task._replicated_params = scalars       # plain attribute (a list is not registered by nn.Module)
    log.info("FSDP2 over %d ranks: %d units + root, params %s / reduce %s, reshard_after_forward=%s",
             world_size, len(units), mp.param_dtype or "fp32", mp.reduce_dtype or "fp32", reshard_after_forward)
    return task


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Wrap one micro-step (forward *and* backward) of gradient accumulation: gradients are reduced across
    ranks only when ``sync`` (the last micro-batch). DDP: ``no_sync()``; FSDP2:
    ``set_requires_gradient_sync``, read in the post-backward hooks, so backward must run inside."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        if sync:
            _all_reduce_replicated_grads(model)
    else:
        yield


def _all_reduce_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the parameters FSDP2 leaves unsharded (see :func:`wrap`) across ranks."""
    params = [p for p in getattr(model, "_replicated_params", []) if p.requires_grad]
    if not params:
        return
    flat = torch.stack([p.grad.reshape(()) if p.grad is not None else torch.zeros((), device=p.device,
                                                                                   dtype=p.dtype)
                        for p in params]).float()
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat):
        p.grad = g.to(p.dtype).reshape(p.shape)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it as a plain tensor (FSDP2: the norm of the sharded DTensor
    gradients is reduced across ranks, so every rank clips by the same factor)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # DTensor and plain gradients cannot share one foreach call: norm each kind, combine, clip each kind.
    plain = [p for p in params if not isinstance(p, DTensor)]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()]
    if plain:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in plain]).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, plain):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def autocast(model: nn.Module, device: torch.device, precision: str):
    """bf16 autocast context for a forward pass; none for fp32, or under FSDP2 on GPU (its
    ``MixedPrecisionPolicy`` casts the gathered parameters instead)."""
    if precision != "bf16" or (is_fsdp(model) and device.type == "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_fsdp(m)]


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Every parameter unsharded (plain tensors) inside the block, on every rank: for evaluation and
    generation code that calls methods rather than ``forward``. No-op unless ``model`` is FSDP2. Collective:
    every rank enters it."""
    if not is_fsdp(model):
        yield
        return
    mods = _fsdp_modules(model)
    # FSDP2 has a public setter for reshard-after-forward but no getter: remember each group's setting
    # (the root's is special-cased by FSDP2) and put it back afterwards.
    saved = []
    for m in mods:
        state = m._get_fsdp_state()
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None),
                      [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]))
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, (state, auto, groups) in zip(mods, saved):
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info
            m.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU: a collective under FSDP2 (every rank must call it;
    every rank gets the tensors), the plain ``state_dict`` otherwise."""
    if not is_fsdp(model):
        return getattr(model, "module", model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
