"""FSDP2 checkpoints: model and optimizer as a torch DCP checkpoint, written by every rank into one folder.

``__{r}_0.distcp`` holds rank r's shards (plain tensors such as the ITC queues are de-duplicated and written
once) and ``.metadata`` (rank 0, DCP's coordinator) the layout. The names carry the rank, so the per-rank
folders Ray merges never collide; each rank's marker lists its DCP files like any other. DCP re-shards on
load, so a DCP checkpoint restores at any world size, into FSDP2, DDP or a single process;
:func:`read_dcp_model` reads it without a process group.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from mplug2 import storage
from mplug2.train.checkpoint.layout import DCP_METADATA, CheckpointError


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               strict: bool = True) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as torch.distributed.checkpoint.state_dict gives them: DTensor shards
    under FSDP2, full tensors for a plain module; optimizer state keyed by parameter name (FQN)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(strict=strict)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=opts)}
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return {"model": msd, "optim": osd}


def _put_file(local: str, url: str) -> None:
    """Move a finished local file to ``url`` (local: rename into place; remote: upload with retries)."""
    if storage.is_remote(url):
        storage.upload_file(local, url)
        return
    path = storage.get_fs(url)[1]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.partial.{os.getpid()}"
    shutil.move(local, tmp)
    os.replace(tmp, path)


def save_dcp(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Every rank: ``dcp.save`` model (+ optimizer) into a scratch folder, move the files this rank wrote
    into ``directory``; returns their names and sizes."""
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory(prefix="mplug2-dcp-") as tmp:
        dcp.save(_dcp_state(model, optimizer), storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True))
        out = {}
        for name in sorted(os.listdir(tmp)):
            src = os.path.join(tmp, name)
            if not os.path.isfile(src):
                raise CheckpointError(f"DCP wrote a folder {name!r}; expected flat files")
            out[name] = os.path.getsize(src)
            _put_file(src, storage.join(directory, name))
    return out


def is_dcp(directory: str) -> bool:
    return storage.exists(storage.join(directory, DCP_METADATA))


@contextmanager
def _local_dcp_dir(directory: str) -> Iterator[str]:
    """A local folder holding the checkpoint's DCP files: the folder itself, or a download of ``.metadata``
    and every ``*.distcp`` (a re-sharding load may need any rank's file)."""
    if not storage.is_remote(directory):
        yield storage.get_fs(directory)[1]
        return
    with tempfile.TemporaryDirectory(prefix="mplug2-dcp-") as tmp:
        for name in storage.list_names(directory):
            if name == DCP_METADATA or name.endswith(".distcp"):
                storage.download_file(storage.join(directory, name), os.path.join(tmp, name))
        yield tmp


def load_dcp(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             strict: bool) -> None:
    """Restore model (+ optimizer) from the DCP files, re-sharding to this run's layout (a collective when a
    process group is initialised: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    opts = StateDictOptions(strict=strict)
    with _local_dcp_dir(directory) as local:
        reader = dcp.FileSystemReader(local)
        saved = {k.split(".", 1)[0] for k in reader.read_metadata().state_dict_metadata}
        if optimizer is not None and "optim" not in saved:
            raise CheckpointError(f"{directory}: no optimizer state saved")
        state = _dcp_state(model, optimizer, strict)
        dcp.load(state, storage_reader=reader)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)


def read_dcp_model(directory: str) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read whole into this process without a process group: the
    full, unsharded tensors whatever world size wrote it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    with _local_dcp_dir(directory) as local:
        # DCP's own reader for dcp_to_torch_save: builds the tensors from the metadata, loads in this process
        _load_state_dict(state, storage_reader=FileSystemReader(local),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    if "model" not in state:
        raise CheckpointError(f"{directory}: the DCP checkpoint holds no model state")
    return dict(state["model"])
