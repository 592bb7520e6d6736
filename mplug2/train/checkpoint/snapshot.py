"""A checkpoint in two halves: a consistent in-memory snapshot on the training thread, the files later.

:func:`take_snapshot` copies everything a resume needs at this optimizer step into CPU memory (model and
optimizer tensors into reusable staging buffers, :mod:`.staging`; scheduler, ``extra``, RNG and data cursor
as plain Python), then training may change its tensors at once. :meth:`Snapshot.write` serialises that copy
into the folder (``model.safetensors``, ``trainer_state.pt``, ``rng_rank{r}.pt``, ``data_rank{r}.json``, the
``done`` marker, on rank 0 the manifest), in a writer process (:mod:`.writer`, the training loop's way) or
inline (:func:`save_checkpoint`). This is the split torch DCP's ``async_save`` and torchtitan make: the step
pays for a memory copy, not for serialisation, disk and network.

Under FSDP2 the model and optimizer go through DCP (:mod:`.dcp`, a collective) while the snapshot is taken;
only the small per-rank files are left to :meth:`Snapshot.write`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mplug2 import storage
from mplug2.train.checkpoint.commit import commit_checkpoint, write_local_atomically
from mplug2.train.checkpoint.dcp import save_dcp
from mplug2.train.checkpoint.layout import MANIFEST_FILE, MODEL_FILE, TRAINER_FILE, config_hash, data_file, \
    done_file, rng_file
from mplug2.train.checkpoint.staging import BackgroundCopy, StagingBuffers, unwrap_model
from mplug2.train.checkpoint.tensorfile import tensor_file_bytes, write_tensor_file
from mplug2.train.parallel import is_fsdp

log = logging.getLogger("mplug2.train.checkpoint")


# --------------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in a form ``torch.load(weights_only=True)`` accepts (copies)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


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


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_file(directory: str, name: str, to_file: Callable[[str], None], to_bytes: Callable[[], bytes],
                durable: bool, make_dirs: bool = True) -> int:
    """Write one payload file so that readers see all of it or nothing; returns its size. A local folder gets
    it straight from the serialiser (``to_file(path)``: safetensors writes from the tensors' memory, no bytes
    object of the whole file; :func:`.commit.write_local_atomically`). Remote: ``to_bytes()`` in one PUT."""
    url = storage.join(directory, name)
    if storage.is_remote(directory):
        data = to_bytes()
        storage.atomic_write(url, data)
        return len(data)
    path = storage.get_fs(url)[1]
    write_local_atomically(path, to_file, durable, make_parents=make_dirs)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- snapshot

@dataclass
class Snapshot:
    """One rank's checkpoint state at one step, in CPU memory, and where and how to write it."""

    directory: str
    step: int
    rank: int
    world_size: int
    config_hash: str
    data_json: bytes                                   # the data cursor, serialised when taken
    rng: dict[str, Any]
    trainer: dict[str, Any] | None = None              # rank 0: optimizer (unless DCP), scheduler, extra
    model: dict[str, torch.Tensor] | None = None       # rank 0 without FSDP2
    aliases: dict[str, str] = field(default_factory=dict)
    dcp_sizes: dict[str, int] = field(default_factory=dict)   # FSDP2: files DCP already wrote into directory
    write_manifest: bool = False                       # rank 0: commit after the marker
    wait_for_ranks_s: float = 0.0                      # ... once every rank's marker is there (0: do not wait)
    durable: bool = True                               # fsync the payload (False: a staging folder, uploaded)
    # False for a staging folder made for this snapshot under the run's scratch folder: if it is gone, the run
    # has ended (a worker died and the driver removed the scratch folder while the writer was still busy), and
    # the write fails rather than create the folders again under /tmp, where nothing would remove them
    make_dirs: bool = True
    taken_s: float = 0.0                               # seconds the snapshot held the training thread
    # CUDA: an event after the device-to-host copies, which run on without blocking the step; write() waits
    copied: Any = field(default=None, repr=False, compare=False)
    # CPU, ``overlap``: the copy of parameters and optimizer state, running beside the next forward/backward
    staged: BackgroundCopy | None = field(default=None, repr=False, compare=False)
    written_s: float | None = None                     # seconds :meth:`write` took, once done
    written_cpu_s: float | None = None                 # CPU seconds it took (writer process or this thread)
    background_s: float | None = None                  # seconds write + upload took off the critical path
    # who serialises it: a writer process (:class:`.writer.SnapshotWriter`), or None for this thread
    writer: Callable[[Snapshot], list[str]] | None = field(default=None, repr=False, compare=False)

    def write(self) -> list[str]:
        """Serialise into :attr:`directory` through :attr:`writer` (another process: the serialisers hold the
        GIL for long stretches, which would stall the training thread), or here when there is none."""
        self.wait_copied()
        return self.writer(self) if self.writer is not None else self.write_here()

    def wait_staged(self) -> None:
        """Block until the copy running beside the training (``overlap``) is done: before the next optimizer
        step changes its sources."""
        staged = self.staged          # the training thread and the writing thread may both wait for it
        if staged is not None:
            staged.synchronize()
            self.staged = None

    def wait_copied(self) -> None:
        """Block until the staged tensors hold their values (CUDA: the asynchronous copies have landed)."""
        self.wait_staged()
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None

    def _write_bytes(self, name: str, data: bytes) -> int:
        def to_file(path: str) -> None:
            with open(path, "wb") as f:
                f.write(data)
        return self._write(name, to_file, lambda: data)

    def _write(self, name: str, to_file: Callable[[str], None], to_bytes: Callable[[], bytes]) -> int:
        return _write_file(self.directory, name, to_file, to_bytes, self.durable, self.make_dirs)

    def write_here(self) -> list[str]:
        """Serialise into :attr:`directory` in this thread: payload, this rank's ``done`` marker, then (rank 0,
        when asked) ``manifest.json`` once all markers are there. Returns the file names this rank wrote."""
        self.wait_copied()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        sizes = dict(self.dcp_sizes)
        if self.model is not None:
            metadata = {"format": "pt", "aliases": json.dumps(self.aliases)}
            model = self.model
            sizes[MODEL_FILE] = self._write(MODEL_FILE, lambda path: write_tensor_file(path, model, metadata),
                                            lambda: tensor_file_bytes(model, metadata))
        if self.trainer is not None:
            trainer = self.trainer
            sizes[TRAINER_FILE] = self._write(TRAINER_FILE, lambda path: torch.save(trainer, path),
                                              lambda: _torch_bytes(trainer))
        small = {rng_file(self.rank): _torch_bytes(self.rng), data_file(self.rank): self.data_json}
        for name, data in small.items():
            sizes[name] = self._write_bytes(name, data)
        marker = {"rank": self.rank, "world_size": self.world_size, "step": self.step, "files": sizes}
        self._write_bytes(done_file(self.rank), json.dumps(marker, sort_keys=True).encode())
        written = [*sizes, done_file(self.rank)]
        if self.write_manifest:
            commit_checkpoint(self.directory, step=self.step, world_size=self.world_size,
                              config_fingerprint=self.config_hash, wait_for_ranks_s=self.wait_for_ranks_s)
            written.append(MANIFEST_FILE)
        self.written_s, self.written_cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
        log.info("checkpoint %s step %d: rank %d wrote %d files, %.1f MiB in %.2fs (snapshot %.3fs)",
                 self.directory, self.step, self.rank, len(written), sum(sizes.values()) / 2**20, self.written_s,
                 self.taken_s)
        return written


def take_snapshot(directory: str, *, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                  scheduler: Any | None, step: int, extra: dict[str, Any] | None, rank: int, world_size: int,
                  data_state: dict[str, Any] | None, config_fingerprint: Any, buffers: StagingBuffers | None = None,
                  write_manifest: bool = False, wait_for_ranks_s: float = 0.0, overlap: bool = False) -> Snapshot:
    """Copy this rank's part of the checkpoint at this step (every rank calls it at the same optimizer step).

    Rank 0 stages model and trainer state; every rank its RNG and data cursor. Under FSDP2 every rank also
    writes its DCP files into ``directory`` now (a collective). Tensors land in ``buffers`` (fresh ones when
    None) by one batched copy; on CUDA the device-to-host copies are queued on the current stream (ordered
    before any later change to the originals, the host does not wait) and :meth:`Snapshot.write` waits for them.
    ``overlap`` (CPU): parameters and optimizer state are copied in a thread while the caller trains on; it
    must call :meth:`Snapshot.wait_staged` before its next optimizer step (buffers, which a forward pass may
    change, are copied before this returns)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    t0 = time.perf_counter()
    buffers = buffers if buffers is not None else StagingBuffers()
    sharded = model is not None and is_fsdp(model)
    # FSDP2: model + optimizer as DCP, every rank (a collective); files land first, the marker lists them.
    snap = Snapshot(directory=directory, step=step, rank=rank, world_size=world_size,
                    config_hash=config_hash(config_fingerprint), rng=rng_state(),
                    data_json=json.dumps(data_state, sort_keys=True, indent=1).encode(),
                    dcp_sizes=save_dcp(directory, model, optimizer) if sharded else {},
                    write_manifest=write_manifest and rank == 0, wait_for_ranks_s=wait_for_ranks_s)
    if rank == 0:
        if model is not None and not sharded:
            snap.model, snap.aliases = buffers.stage_model(unwrap_model(model))
        snap.trainer = {    # the optimizer's state changes only in its step; extra may hold queues
            "step": step,
            "optimizer": buffers.stage_optimizer("trainer/optimizer", optimizer)
            if optimizer is not None and not sharded else None,
            "scheduler": buffers.stage("trainer/scheduler", scheduler.state_dict()) if scheduler is not None else None,
            "extra": buffers.stage("trainer/extra", extra or {}),
        }
    snap.staged = buffers.flush(background=overlap)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The copies are queued on the current stream, so the next step's kernels (which change the
        # originals) run after them; the host goes on at once and write() waits for this event.
        snap.copied = torch.cuda.Event()
        snap.copied.record()
    snap.taken_s = time.perf_counter() - t0
    return snap


def save_checkpoint(directory: str, *, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None, step: int, extra: dict[str, Any] | None, rank: int, world_size: int,
                    data_state: dict[str, Any] | None, config_fingerprint: Any, write_manifest: bool = True,
                    wait_for_ranks_s: float = 600.0) -> list[str]:
    """Write this rank's part of a checkpoint now: :func:`take_snapshot`, then :meth:`Snapshot.write`.

    Rank 0 waits (up to ``wait_for_ranks_s``; 0 = do not wait, e.g. when each rank writes to its own folder
    that Ray merges) for all markers and writes ``manifest.json`` last. Returns the file names this rank
    wrote, marker included."""
    return take_snapshot(directory, model=model, optimizer=optimizer, scheduler=scheduler, step=step, extra=extra,
                         rank=rank, world_size=world_size, data_state=data_state,
                         config_fingerprint=config_fingerprint, write_manifest=write_manifest,
                         wait_for_ranks_s=wait_for_ranks_s).write()
