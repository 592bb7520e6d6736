"""Restore a run from a valid checkpoint: model, optimizer, scheduler, this rank's RNG and data cursor."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load

from mplug2 import storage
from mplug2.train.checkpoint.commit import checkpoint_problems
from mplug2.train.checkpoint.dcp import is_dcp, load_dcp, read_dcp_model
from mplug2.train.checkpoint.layout import MODEL_FILE, TRAINER_FILE, CheckpointError, config_hash, data_file, \
    read_json, rng_file
from mplug2.train.checkpoint.snapshot import set_rng_state
from mplug2.train.checkpoint.staging import unwrap_model
from mplug2.train.parallel import is_fsdp

log = logging.getLogger("mplug2.train.checkpoint")


@dataclass
class LoadedCheckpoint:
    step: int
    extra: dict[str, Any]
    data_state: dict[str, Any] | None     # None when the world size changed (no cursor for this rank)
    manifest: dict[str, Any]


def read_model_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors by name, tied weights (stored once) restored under every alias.

    A DCP (FSDP2) checkpoint is read whole into this process, without a process group: the full,
    unsharded tensors whatever world size wrote it."""
    if is_dcp(directory):
        return read_dcp_model(directory)
    raw = storage.read_bytes(storage.join(directory, MODEL_FILE))
    tensors = st_load(raw)
    header_len = int.from_bytes(raw[:8], "little")   # safetensors: u64 header length, JSON header
    meta = json.loads(raw[8:8 + header_len]).get("__metadata__", {}) or {}
    for alias, canonical in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[canonical]
    return tensors


def _load_torch(url: str) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def load_checkpoint(directory: str, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None, rank: int = 0,
                    world_size: int | None = None, config_fingerprint: Any | None = None,
                    restore_rng: bool = True, strict: bool = True) -> LoadedCheckpoint:
    """Restore model, optimizer, scheduler, this rank's RNG, and return step, extra and this rank's cursor.

    Refuses an invalid checkpoint or one made for another config hash. A different world size restores
    weights and optimizer but no per-rank RNG or cursor (an elastic resize), with a warning. A DCP (FSDP2)
    checkpoint loads into any layout (a collective: every rank calls this); a safetensors (DDP) checkpoint
    cannot resume an FSDP2 run (its optimizer state is not sharded): use ``init_from`` for the weights.
    """
    problems, manifest = checkpoint_problems(directory)
    if problems:
        raise CheckpointError(f"{directory} is not a valid checkpoint: {'; '.join(problems)}")
    if config_fingerprint is not None and manifest["config_hash"] != config_hash(config_fingerprint):
        raise CheckpointError(f"{directory}: config hash {manifest['config_hash'][:12]} differs from this run's "
                              f"{config_hash(config_fingerprint)[:12]}; numerics would silently drift")
    dcp_ckpt = is_dcp(directory)
    if dcp_ckpt and model is not None:
        load_dcp(directory, unwrap_model(model), optimizer, strict)
    elif dcp_ckpt and optimizer is not None:
        raise CheckpointError(f"{directory}: a DCP checkpoint restores the optimizer together with its model")
    elif model is not None and is_fsdp(model):
        raise CheckpointError(f"{directory} was written without FSDP2 (model.safetensors) and cannot resume an "
                              "FSDP2 run; resume it with scale.strategy=ddp, or start a new run with init_from")
    elif model is not None:
        tensors = read_model_tensors(directory)
        target = unwrap_model(model)
        device_state = {k: v.to(target.state_dict()[k].device) if k in target.state_dict() else v
                        for k, v in tensors.items()}
        target.load_state_dict(device_state, strict=strict)
    trainer = _load_torch(storage.join(directory, TRAINER_FILE))
    if optimizer is not None and not dcp_ckpt:
        if trainer["optimizer"] is None:
            raise CheckpointError(f"{directory}: no optimizer state saved")
        optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None:
        if trainer["scheduler"] is None:
            raise CheckpointError(f"{directory}: no scheduler state saved")
        scheduler.load_state_dict(trainer["scheduler"])
    data_state = None
    saved_world = int(manifest["world_size"])
    if world_size is None or world_size == saved_world:
        if restore_rng:
            set_rng_state(_load_torch(storage.join(directory, rng_file(rank))))
        data_state = read_json(storage.join(directory, data_file(rank)))
    else:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: weights and optimizer restored, "
                    "per-rank RNG and data cursors are not (data restarts at an epoch boundary)",
                    directory, saved_world, world_size)
    log.info("restored checkpoint %s at step %d (rank %d)", directory, trainer["step"], rank)
    return LoadedCheckpoint(step=int(trainer["step"]), extra=trainer["extra"], data_state=data_state,
                            manifest=manifest)
