"""A checkpoint in two halves: a consistent in-memory snapshot on the training thread, the files later.

:func:`take_snapshot` copies everything a resume needs at this optimizer step into CPU memory (model and
optimizer tensors into reusable staging buffers, pinned when the source is on CUDA; scheduler, ``extra``,
RNG and data cursor as plain Python), then training may change its tensors at once. :meth:`Snapshot.write`
serialises that copy into the folder (``model.safetensors``, ``trainer_state.pt``, ``rng_rank{r}.pt``,
``data_rank{r}.json``, the ``done`` marker, on rank 0 the manifest), in a writer process (:mod:`.writer`,
the training loop's way) or inline (:func:`save_checkpoint`). This is the split torch DCP's ``async_save`` and torchtitan make: the step pays
for a memory copy, not for serialisation, disk and network.

Under FSDP2 the model and optimizer go through DCP (:mod:`.dcp`, a collective) while the snapshot is taken;
only the small per-rank files are left to :meth:`Snapshot.write`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mplug2 import storage
from mplug2.train.checkpoint.commit import commit_checkpoint, write_local_atomically
from mplug2.train.checkpoint.dcp import save_dcp
from mplug2.train.checkpoint.layout import MANIFEST_FILE, MODEL_FILE, TRAINER_FILE, config_hash, data_file, \
    done_file, rng_file
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


# ----------------------------------------------------------------------------------------------- staging

_ATOMS = frozenset({int, float, bool, str, bytes, type(None)})    # immutable: a container of them copies shallowly


class StagingBuffers:
    """CPU tensors a snapshot copies into, kept from one checkpoint to the next (no allocation, no page
    faults on the step; pinned memory for asynchronous device-to-host copies when the source is on CUDA).

    ``shared=True`` allocates them in shared memory (``share_memory_()``, once; pinned in place on CUDA, as
    torch DCP's process-based async save does) so a writer process (:mod:`.writer`) reads them without a copy
    or a pickle: :meth:`take_new` hands it the buffers allocated since the last hand-off, :meth:`key_of` names
    the rest.

    Reuse is safe only once the previous snapshot's files are written: the training loop takes the next
    snapshot after waiting for the previous checkpoint (one in flight at most)."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self._buffers: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}               # id(buffer) -> key, for the writer's references
        self._new: dict[str, torch.Tensor] = {}       # allocated since the last take_new()
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])   # (buffers, sources)
        self._stable: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])    # ... unchanged until the
        #                                                                          next optimizer step

    def copy(self, key: str, t: torch.Tensor, stable: bool = False) -> torch.Tensor:
        """The buffer for ``key``, shaped like ``t``; ``t`` is copied into it at the next :meth:`flush` (one
        ``torch._foreach_copy_`` for the whole snapshot instead of a Python call per tensor: ~1 500 tensors
        in the tiny model and its AdamW state). ``stable``: ``t`` does not change before the next optimizer
        step (parameters, optimizer state; not buffers such as ITC queues, which the forward pass updates),
        so its copy may run beside the next forward and backward (:meth:`flush` with ``background``)."""
        if t.requires_grad:
            t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._allocate(t)
            if key in self._buffers:
                self._keys.pop(id(self._buffers[key]), None)
            self._buffers[key] = buf
            if self.shared and buf.is_shared():
                self._keys[id(buf)] = key
                self._new[key] = buf
        group = self._stable if stable else self._pending
        group[0].append(buf)
        group[1].append(t)
        return buf

    def flush(self, background: bool = False) -> BackgroundCopy | None:
        """Copy every source registered by :meth:`copy` since the last flush into its buffer (asynchronous
        device-to-host copies into pinned buffers on CUDA: synchronise before reading them).

        ``background`` (CPU sources only): the ``stable`` sources are copied in a thread, returned; wait for it
        (:meth:`BackgroundCopy.synchronize`) before the next optimizer step and before reading the buffers."""
        dsts, srcs = self._pending[0] + self._stable[0], self._pending[1] + self._stable[1]
        later = background and self._stable[0] and not any(t.is_cuda for t in srcs)
        if later:
            dsts, srcs = self._pending
            later_copy = BackgroundCopy(*self._stable)
        self._pending, self._stable = ([], []), ([], [])
        if dsts:
            torch._foreach_copy_(dsts, srcs, non_blocking=any(t.is_cuda for t in srcs))
        return later_copy if later else None

    def _allocate(self, t: torch.Tensor) -> torch.Tensor:
        if not self.shared or t.numel() == 0:         # an empty tensor has no memory to share: sent by value
            return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu").share_memory_()
        if t.is_cuda:                                 # pin the shared pages in place (pin_memory() would copy)
            import torch.cuda._pin_memory_utils as pin

            pin.pin_memory(buf.data_ptr(), buf.numel() * buf.element_size())
            weakref.finalize(buf, pin.unpin_memory, buf.data_ptr())
        return buf

    def key_of(self, t: torch.Tensor) -> str | None:
        """The key of a shared buffer (None for any other tensor)."""
        return self._keys.get(id(t))

    def take_new(self) -> dict[str, torch.Tensor]:
        """The shared buffers allocated (or re-allocated for a new shape) since the last call."""
        new, self._new = self._new, {}
        return new

    def resend_all(self) -> None:
        """Hand every shared buffer over again at the next :meth:`take_new` (to a new writer process)."""
        self._new = {key: buf for key, buf in self._buffers.items() if id(buf) in self._keys}

    def stage(self, key: str, obj: Any, stable: bool = False) -> Any:
        """A copy of ``obj`` (nested dicts / lists / tuples) whose tensors live in the buffers, the rest
        deep-copied (``stable``: as in :meth:`copy`, for every tensor in it)."""
        if isinstance(obj, torch.Tensor):
            return self.copy(key, obj, stable)
        if isinstance(obj, dict):
            return {k: self.stage(f"{key}/{k}", v, stable) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            if all(type(v) in _ATOMS for v in obj):       # e.g. a param group's 500 parameter ids: one copy
                return type(obj)(obj)
            return type(obj)(self.stage(f"{key}/{i}", v, stable) for i, v in enumerate(obj))
        return copy.deepcopy(obj)


class BackgroundCopy:
    """One batched copy off the training thread: ``torch._foreach_copy_`` holds no GIL while it copies, so on a
    free core the memcpy of a snapshot's weights and optimizer state (~6 ms for the tiny model) leaves the
    training thread's step. Copies run one after another in one daemon thread per process, started at the
    first (starting a thread per checkpoint made the step wait ~1 ms for it to be scheduled)."""

    _jobs: queue.SimpleQueue[BackgroundCopy] = queue.SimpleQueue()
    _thread: threading.Thread | None = None
    _lock = threading.Lock()

    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        self._work: tuple[list[torch.Tensor], list[torch.Tensor]] | None = (dsts, srcs)
        self._done = threading.Event()
        self._error: BaseException | None = None
        with BackgroundCopy._lock:
            thread = BackgroundCopy._thread
            if thread is None or not thread.is_alive():           # not alive: in a forked child
                BackgroundCopy._jobs = queue.SimpleQueue()
                thread = BackgroundCopy._thread = threading.Thread(
                    target=BackgroundCopy._serve, args=(BackgroundCopy._jobs,), name="mplug2-ckpt-stage",
                    daemon=True)
                thread.start()
            BackgroundCopy._jobs.put(self)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[BackgroundCopy]) -> None:
        while True:
            job = jobs.get()
            try:
                job._run(*job._work)
            except BaseException as exc:       # raised where the copy is waited for
                job._error = exc
            finally:
                job._work = None               # the sources are the live weights: not held past the copy
                job._done.set()

    def _run(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        torch._foreach_copy_(dsts, srcs)

    def synchronize(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)   # DDP / prepare_model wrappers


def _stage_model(model: torch.nn.Module, buffers: StagingBuffers) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors by name, each storage copied once; tied names recorded as aliases of the first.
    Parameters are ``stable`` (only the optimizer step and the momentum update after it change them)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    # keep_vars: parameters come as themselves, so no second walk of the module tree finds them (~1 ms of the
    # training thread per checkpoint in the tiny model)
    for name, t in unwrap_model(model).state_dict(keep_vars=True).items():
        # the same memory, shape and dtype: a tied name (data_ptr = storage start + offset)
        ident = (t.data_ptr() if t.numel() else id(t), tuple(t.shape), t.dtype)
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        # own, contiguous storage: safetensors accepts it
        tensors[name] = buffers.copy(f"model/{name}", t,
                                     stable=t.numel() > 0 and isinstance(t, torch.nn.Parameter))
    return tensors, aliases


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
            snap.model, snap.aliases = _stage_model(model, buffers)
        snap.trainer = {    # the optimizer's state changes only in its step; extra may hold queues
            "step": step,
            "optimizer": buffers.stage("trainer/optimizer", optimizer.state_dict(), stable=True)
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
