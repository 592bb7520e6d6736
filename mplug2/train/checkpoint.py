"""The checkpoint format: per-rank files, a per-rank ``done`` marker, and ``manifest.json`` written last.

Layout of one checkpoint folder (local or ``s3://``; ``training-and-ops.md`` §1.4)::

    model.safetensors        rank 0   model weights (momentum copies included: they are parameters/buffers)
    trainer_state.pt         rank 0   optimizer, LR scheduler, ``extra`` (queues, GradScaler, step counters)
    rng_rank{r}.pt           rank r   python, numpy, torch CPU and CUDA RNG states
    data_rank{r}.json        rank r   the data cursor (``MixedLoader``/``CorpusLoader.state_dict()``)
    done_rank{r}.json        rank r   LAST per rank: names and sizes of the files this rank wrote
    manifest.json            rank 0   LAST overall: step, world size, config hash, code and library versions

Under FSDP2 (``scale.strategy: fsdp2``) the model and optimizer are a torch DCP checkpoint instead, written by
every rank into the same folder: ``__{r}_0.distcp`` (rank r's shards; plain tensors such as the ITC queues
are de-duplicated and written once) and ``.metadata`` (rank 0, DCP's coordinator). The names carry the rank,
so the per-rank folders Ray merges never collide; each rank's marker lists its DCP files like any other,
and ``trainer_state.pt`` then holds no optimizer. DCP re-shards on load, so a DCP checkpoint restores at any
world size, into FSDP2, DDP or a single process; :func:`read_model_tensors` reads it without a process group.

A checkpoint counts only if the manifest exists and all ``world_size`` markers list files that exist with
their recorded sizes; :func:`find_latest_valid` skips the rest, loudly; storage that stays down past its retry
deadline raises instead (never a silent fall-back). :func:`upload_checkpoint` puts payload files first, markers
next, the manifest last, each retried through an S3 restart. Pure torch + storage (no Ray), so the
Ray wiring can write through ``checkpoint_upload_fn`` or straight to storage with ``NO_UPLOAD``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mplug2 import storage
from mplug2.train.parallel import is_fsdp

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION", "MODEL_FILE", "TRAINER_FILE", "MANIFEST_FILE", "save_checkpoint", "commit_checkpoint",
    "validate_checkpoint", "load_checkpoint", "find_latest_valid", "LoadedCheckpoint", "CheckpointError",
    "config_hash", "code_version", "rng_state", "set_rng_state", "upload_checkpoint",
]

FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, MANIFEST_FILE = "model.safetensors", "trainer_state.pt", "manifest.json"
DCP_METADATA = ".metadata"       # torch DCP's coordinator file; rank files are ``__{rank}_0.distcp``


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def data_file(rank: int) -> str:
    return f"data_rank{rank}.json"


def done_file(rank: int) -> str:
    return f"done_rank{rank}.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, inconsistent, or made for a different configuration."""


# ------------------------------------------------------------------------------------------ provenance

def config_hash(config: Any) -> str:
    """sha256 of a config (dict, dataclass-as-dict, or an already computed hash string)."""
    if isinstance(config, str):
        return config
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """git sha and dirty flag of the source tree, torch and ray versions (ray read from metadata, not imported)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {"git_sha": sha, "git_dirty": bool(status) if sha else None, "torch": torch.__version__, "ray": ray_version}


# --------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; not restored",
                        len(state["cuda"]), torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ------------------------------------------------------------------------------------------------- save

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)   # DDP / prepare_model wrappers


def _model_bytes(model: torch.nn.Module) -> bytes:
    """safetensors bytes; tied tensors are stored once and their other names recorded as aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in _unwrap(model).state_dict().items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr() if t.numel() else id(t), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.cpu().contiguous()
    # tensors that share storage but differ in view still trip safetensors; clone those
    ptrs: dict[int, str] = {}
    for name in list(tensors):
        ptr = tensors[name].untyped_storage().data_ptr()
        if tensors[name].numel() and ptr in ptrs:
            tensors[name] = tensors[name].clone()
        ptrs[ptr] = name
    return st_save(tensors, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(directory: str, *, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None, step: int, extra: dict[str, Any] | None, rank: int, world_size: int,
                    data_state: dict[str, Any] | None, config_fingerprint: Any, write_manifest: bool = True,
                    wait_for_ranks_s: float = 600.0) -> list[str]:
    """Write this rank's part of a checkpoint (every rank calls it at the same optimizer step).

    Rank 0 writes model and trainer state; every rank writes its RNG and data cursor, then its ``done``
    marker. Rank 0 then waits (up to ``wait_for_ranks_s``; 0 = do not wait, e.g. when each rank writes to
    its own folder that Ray merges) for all markers and writes ``manifest.json`` last. Returns the file names
    this rank wrote, marker included.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    t0 = time.perf_counter()
    files: dict[str, bytes] = {}
    sharded = model is not None and is_fsdp(model)
    # FSDP2: model + optimizer as DCP, every rank (a collective); files land first, the marker lists them.
    dcp_sizes = _save_dcp(directory, model, optimizer) if sharded else {}
    if rank == 0:
        if model is not None and not sharded:
            files[MODEL_FILE] = _model_bytes(model)
        files[TRAINER_FILE] = _torch_bytes({
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None and not sharded else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra or {},
        })
    files[rng_file(rank)] = _torch_bytes(rng_state())
    files[data_file(rank)] = json.dumps(data_state, sort_keys=True, indent=1).encode()
    for name, data in files.items():
        storage.atomic_write(storage.join(directory, name), data)
    sizes = {**dcp_sizes, **{n: len(d) for n, d in files.items()}}
    marker = {"rank": rank, "world_size": world_size, "step": step, "files": sizes}
    storage.atomic_write(storage.join(directory, done_file(rank)), json.dumps(marker, sort_keys=True).encode())
    written = [*dcp_sizes, *files, done_file(rank)]
    if rank == 0 and write_manifest:
        commit_checkpoint(directory, step=step, world_size=world_size, config_fingerprint=config_fingerprint,
                          wait_for_ranks_s=wait_for_ranks_s)
        written.append(MANIFEST_FILE)
    log.info("checkpoint %s step %d: rank %d wrote %d files, %.1f MiB in %.2fs", directory, step, rank,
             len(written), sum(sizes.values()) / 2**20, time.perf_counter() - t0)
    return written


# ------------------------------------------------------------------------------------- DCP (FSDP2)

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


def _save_dcp(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
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


def _is_dcp(directory: str) -> bool:
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


def _load_dcp(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
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


def commit_checkpoint(directory: str, *, step: int, world_size: int, config_fingerprint: Any,
                      wait_for_ranks_s: float = 600.0, poll_s: float = 0.5) -> None:
    """Rank 0: wait for every rank's marker (when ``wait_for_ranks_s`` > 0), then write ``manifest.json``."""
    if wait_for_ranks_s > 0:
        deadline = time.monotonic() + wait_for_ranks_s
        missing = list(range(world_size))
        while True:
            missing = [r for r in missing if not storage.exists(storage.join(directory, done_file(r)))]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"{directory}: ranks {missing} wrote no done marker within "
                                      f"{wait_for_ranks_s:.0f}s; manifest not written")
            time.sleep(poll_s)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
                "config_hash": config_hash(config_fingerprint), "code": code_version(), "time": time.time()}
    storage.atomic_write(storage.join(directory, MANIFEST_FILE), json.dumps(manifest, sort_keys=True, indent=1).encode())


def _upload_rank(name: str) -> int:
    """Upload order inside one checkpoint folder: payload (0), then ``done`` markers (1), ``manifest.json`` (2)."""
    if name == MANIFEST_FILE:
        return 2
    return 1 if name.startswith("done_rank") else 0


def upload_checkpoint(local_dir: str, dest: str) -> list[str]:
    """Copy a finished local checkpoint folder (or one rank's part of it) to ``dest``, commit markers last.

    A stale ``manifest.json`` at ``dest`` (an earlier attempt at the same step) is deleted first, then the
    payload files go up, then the ``done`` markers, then the manifest: a reader never sees a manifest over
    files that are still changing. Each file is one PUT (visible only when complete) retried through
    :func:`mplug2.storage.retry_io` until ``$MPLUG2_S3_RETRY_DEADLINE_S``, so an S3 restart mid-upload costs
    time, not the checkpoint; past the deadline :class:`mplug2.storage.StorageUnavailableError` is raised and
    the folder stays invalid (no manifest) until a later attempt completes it. Returns the names uploaded.
    """
    t0 = time.perf_counter()
    names = sorted((n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n))),
                   key=lambda n: (_upload_rank(n), n))
    if MANIFEST_FILE in names:
        storage.remove(storage.join(dest, MANIFEST_FILE))
    total = 0
    for name in names:
        local = os.path.join(local_dir, name)
        total += os.path.getsize(local)
        url = storage.join(dest, name)
        if storage.is_remote(dest):
            storage.upload_file(local, url)
        else:
            with open(local, "rb") as f:
                storage.atomic_write(url, f.read())
    log.info("uploaded checkpoint %s: %d files, %.1f MiB in %.2fs", dest, len(names), total / 2**20,
             time.perf_counter() - t0)
    return names


# --------------------------------------------------------------------------------------- validate / find

def _read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


def _problems(directory: str) -> tuple[list[str], dict[str, Any] | None]:
    """What makes ``directory`` unusable (empty list = valid), and its manifest if readable."""
    murl = storage.join(directory, MANIFEST_FILE)
    try:
        manifest = _read_json(murl)
    except FileNotFoundError:
        return ["no manifest.json (interrupted before commit)"], None
    except storage.StorageUnavailableError:
        raise    # storage is down: "invalid" would silently fall back to an older checkpoint
    except (OSError, ValueError) as exc:
        return [f"unreadable manifest.json ({exc!r})"], None
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"manifest format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}"], manifest
    problems = []
    for r in range(int(manifest["world_size"])):
        try:
            marker = _read_json(storage.join(directory, done_file(r)))
        except FileNotFoundError:
            problems.append(f"rank {r} marker {done_file(r)} missing")
            continue
        except storage.StorageUnavailableError:
            raise
        except (OSError, ValueError) as exc:
            problems.append(f"rank {r} marker unreadable ({exc!r})")
            continue
        if marker.get("step") != manifest["step"]:
            problems.append(f"rank {r} marker is for step {marker.get('step')}, manifest for {manifest['step']}")
        for name, size in marker.get("files", {}).items():
            try:
                actual = storage.size(storage.join(directory, name))
            except FileNotFoundError:
                problems.append(f"{name} (rank {r}) missing")
                continue
            if actual != size:
                problems.append(f"{name} (rank {r}) has {actual} bytes, marker says {size}")
    return problems, manifest


def validate_checkpoint(directory: str) -> bool:
    """True iff the manifest exists and all ``world_size`` markers match the files present."""
    problems, _ = _problems(directory)
    if problems:
        log.warning("checkpoint %s is invalid: %s", directory, "; ".join(problems))
    return not problems


STEP_PREFIX = "step_"


def list_step_checkpoints(run_dir: str) -> list[str]:
    """Every ``step_NNNNNNNN`` folder under a run directory, oldest first (names sort by step)."""
    try:
        names = sorted(storage.list_names(run_dir))
    except FileNotFoundError:
        return []
    return [storage.join(run_dir, n) for n in names if n.startswith(STEP_PREFIX)]


def find_latest_valid(checkpoints: Iterable[str]) -> str | None:
    """The valid checkpoint with the highest step (ties: later in the list); invalid ones are skipped with a
    warning naming what is wrong."""
    best: tuple[int, int, str] | None = None
    for i, directory in enumerate(checkpoints):
        problems, manifest = _problems(directory)
        if problems:
            log.warning("skipping checkpoint %s: %s", directory, "; ".join(problems))
            continue
        key = (int(manifest["step"]), i, directory)
        if best is None or key > best:
            best = key
    if best is None:
        log.warning("no valid checkpoint found")
        return None
    log.info("latest valid checkpoint: %s (step %d)", best[2], best[0])
    return best[2]


# -------------------------------------------------------------------------------------------------- load

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
    if _is_dcp(directory):
        return _read_dcp_model(directory)
    raw = storage.read_bytes(storage.join(directory, MODEL_FILE))
    tensors = st_load(raw)
    header_len = int.from_bytes(raw[:8], "little")   # safetensors: u64 header length, JSON header
    meta = json.loads(raw[8:8 + header_len]).get("__metadata__", {}) or {}
    for alias, canonical in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[canonical]
    return tensors


def _read_dcp_model(directory: str) -> dict[str, torch.Tensor]:
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
    problems, manifest = _problems(directory)
    if problems:
        raise CheckpointError(f"{directory} is not a valid checkpoint: {'; '.join(problems)}")
    if config_fingerprint is not None and manifest["config_hash"] != config_hash(config_fingerprint):
        raise CheckpointError(f"{directory}: config hash {manifest['config_hash'][:12]} differs from this run's "
                              f"{config_hash(config_fingerprint)[:12]}; numerics would silently drift")
    dcp_ckpt = _is_dcp(directory)
    if dcp_ckpt and model is not None:
        _load_dcp(directory, _unwrap(model), optimizer, strict)
    elif dcp_ckpt and optimizer is not None:
        raise CheckpointError(f"{directory}: a DCP checkpoint restores the optimizer together with its model")
    elif model is not None and is_fsdp(model):
        raise CheckpointError(f"{directory} was written without FSDP2 (model.safetensors) and cannot resume an "
                              "FSDP2 run; resume it with scale.strategy=ddp, or start a new run with init_from")
    elif model is not None:
        tensors = read_model_tensors(directory)
        target = _unwrap(model)
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
        data_state = _read_json(storage.join(directory, data_file(rank)))
    else:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: weights and optimizer restored, "
                    "per-rank RNG and data cursors are not (data restarts at an epoch boundary)",
                    directory, saved_world, world_size)
    log.info("restored checkpoint %s at step %d (rank %d)", directory, trainer["step"], rank)
    return LoadedCheckpoint(step=int(trainer["step"]), extra=trainer["extra"], data_state=data_state,
                            manifest=manifest)
