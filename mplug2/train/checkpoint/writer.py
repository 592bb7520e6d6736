"""A long-lived writer process that serialises snapshots, so that the training thread never waits for the GIL.

safetensors and ``torch.save`` hold the GIL through long native calls; run in a thread of the training
process they slowed the step after every checkpoint by 40-80 % (``docs/benchmarks.md``, issue 13), though
the step's own CPU time was unchanged. As torch DCP's ``AsyncCheckpointerType.PROCESS`` and torchtitan's
``async_with_pinned_mem`` do, the snapshot's tensors live in shared-memory staging buffers
(:class:`~.staging.StagingBuffers` with ``shared=True``) and one process per run, spawned before the first
training step (:meth:`SnapshotWriter.start`) and running at a lower CPU priority, turns them into files. A
message carries the snapshot pickled with references in place of its staged tensors, the handles of the
shared segments created since the previous message and where the buffers allocated since then lie in them
(once per run unless a shape changes: :class:`~.staging.SharedSegments`; the few small tensors left, RNG
states, go by value), and the plans' staged structures the writer does not hold yet (once per run unless a
plan changes); the reply is the list of files written, or the writer's exception, raised again in the caller.

Only the local write happens there: the upload stays in the training process's background thread (network
waits release the GIL; storage credentials, retries and their logs stay where the run is), so the writer
needs no storage options at all. The process is spawned (no fork of a process with threads and CUDA
state): like a spawn-context DataLoader, a script that trains at module level needs the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the reductions that send shared tensors as handles)

from mplug2.tensor_bytes import tensor_reduction
from mplug2.train.checkpoint.layout import CheckpointError
from mplug2.train.checkpoint.snapshot import Snapshot
from mplug2.train.checkpoint.staging import StagingBuffers, segment_view

log = logging.getLogger("mplug2.train.checkpoint")

__all__ = ["SnapshotWriter"]

# Below the training process: on a loaded host the write takes longer (and the next checkpoint may wait for
# it: ``ckpt_wait_s``), but it does not take the training threads' cores (docs/benchmarks.md, issue 13).
WRITER_NICENESS = 10


class _RefPickler(pickle.Pickler):
    """Pickles a snapshot for the writer with its staged tensors as their buffers' keys (a persistent id
    looked up by ``id``: one dict lookup per object, no walk building a copy of the snapshot first); any other
    tensor (the RNG states, a few KiB) goes by value. :class:`ForkingPickler` would send it as a handle: a
    new shared-memory segment per tensor and checkpoint, whose file descriptor the writer fetches from
    multiprocessing's resource-sharer thread here over an authenticated connection, for a few KiB.

    A plan's staged structure (:meth:`StagingBuffers.structure_key`: the model's name -> buffer dict, an
    optimizer's per-parameter state) that the writer already holds goes as its key too, and pickling stops
    there: the tiny model's hand-off was ~4,000 objects and ~100 KB, 1.3 ms of a thread beside the training
    step holding the GIL; now 14 KB and 0.4 ms. :attr:`structures` collects the structures referenced;
    ``inline`` is one being sent whole."""

    def __init__(self, file: io.BytesIO, buffers: StagingBuffers, inline: Any = None) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._key_of, self._structure_key = buffers.key_of, buffers.structure_key
        self._inline = inline
        self.structures: dict[str, Any] = {}                 # key -> structure, referenced by this pickle

    def persistent_id(self, obj: Any) -> str | tuple[str, str] | None:
        key = self._key_of(obj)
        if key is not None or obj is self._inline:
            return key
        structure = self._structure_key(obj)
        if structure is None:
            return None
        self.structures[structure] = obj
        return ("structure", structure)

    def reducer_override(self, obj: Any) -> Any:
        # torch's own by-value pickling of a tensor does not load again (``UntypedStorage`` has no ``dtype``)
        if isinstance(obj, torch.Tensor):
            return tensor_reduction(obj)
        return NotImplemented


class _RefUnpickler(pickle.Unpickler):
    """The writer's side of :class:`_RefPickler`: a key is the writer's mapping of that staging buffer, or a
    structure it was sent before (:attr:`referenced` collects those)."""

    def __init__(self, file: io.BytesIO, tensors: dict[str, torch.Tensor],
                 structures: dict[str, Any] | None = None) -> None:
        super().__init__(file)
        self._tensors, self._structures = tensors, structures if structures is not None else {}
        self.referenced: set[str] = set()

    def persistent_load(self, key: str | tuple[str, str]) -> Any:
        if isinstance(key, tuple):
            self.referenced.add(key[1])
            return self._structures[key[1]]
        return self._tensors[key]


def _dumps(snap: Snapshot, buffers: StagingBuffers, held: frozenset[str] = frozenset()) \
        -> tuple[bytes, dict[str, bytes], frozenset[str]]:
    """The message for the writer: ``snap`` pickled, the structures it references that the writer does not hold
    yet (``held``) pickled each on its own, and the keys of every structure it references (what the writer
    holds once it has read the message: it drops those it was not sent this time)."""
    out = io.BytesIO()
    pickler = _RefPickler(out, buffers)
    pickler.dump(snap)
    new: dict[str, bytes] = {}
    for key, structure in pickler.structures.items():
        if key not in held:
            raw = io.BytesIO()
            _RefPickler(raw, buffers, inline=structure).dump(structure)
            new[key] = raw.getvalue()
    return out.getvalue(), new, frozenset(pickler.structures)


def _serve(conn: Connection) -> None:
    """The writer process: write each snapshot it is sent, reply with its files or its error; stop on
    ``None`` or when the training process is gone (end of file on the pipe)."""
    try:
        os.nice(WRITER_NICENESS)
    except OSError:
        pass
    torch.set_num_threads(1)
    segments: dict[int, torch.Tensor] = {}           # the shared staging memory, mapped once each
    tensors: dict[str, torch.Tensor] = {}            # the staging buffers in it, by key
    structures: dict[str, Any] = {}                  # the plans' staged structures, as last referenced
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        payload, (new_segments, new_buffers), new_structures = message
        segments.update(new_segments)
        tensors.update({key: segment_view(segments[index], *where, own_storage=True)
                        for key, (index, *where) in new_buffers.items()})
        try:
            structures.update({key: _RefUnpickler(io.BytesIO(raw), tensors).load()
                               for key, raw in new_structures.items()})
            unpickler = _RefUnpickler(io.BytesIO(payload), tensors, structures)
            snap = unpickler.load()
            structures = {key: structures[key] for key in unpickler.referenced}   # what the sender counts on
            cpu0 = time.process_time()
            written = snap.write_here()
            reply: tuple = ("done", written, (snap.written_s, time.process_time() - cpu0))
        except Exception as exc:       # the caller raises it; one that cannot be pickled goes as its repr
            try:
                pickle.dumps(exc)
                reply = ("error", exc, None)
            except Exception:
                reply = ("error", CheckpointError(f"checkpoint writer: {exc!r}"), None)
        conn.send(reply)


def _how_it_ended(process: multiprocessing.process.BaseProcess | None, wait_s: float = 5.0) -> str:
    """How the writer process ended, for the error: its pipe reads as closed a moment before the kernel reaps
    it, so wait briefly for its exit status. A signal is named (SIGKILL: the OOM killer or an operator; SIGBUS:
    shared memory, ``/dev/shm``, ran out), else the exit code."""
    if process is None:
        return "never started"
    process.join(wait_s)
    code = process.exitcode
    if code is None:
        return f"pid {process.pid} still running after its pipe closed"
    if code < 0:
        try:
            return f"pid {process.pid} killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"pid {process.pid} killed by signal {-code}"
    return f"pid {process.pid} exit code {code}"


class SnapshotWriter:
    """Write snapshots whose tensors are in ``buffers`` (``shared=True``) in a process of their own.

    :meth:`write` blocks its caller (a background thread) until the files are written and raises the
    writer's error; calls are serialised. :meth:`close` waits for a write in progress, stops the process and
    joins it; a writer that died is reported as a :class:`CheckpointError` at the next write."""

    def __init__(self, buffers: StagingBuffers, name: str = "mplug2-ckpt-writer", close_timeout_s: float = 120.0):
        if not buffers.shared:
            raise ValueError("SnapshotWriter needs StagingBuffers(shared=True)")
        self.buffers, self.name, self.close_timeout_s = buffers, name, close_timeout_s
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._warned = False
        self._held: frozenset[str] = frozenset()      # the staged structures the writer process holds

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the process now (else at the first write): importing torch there takes seconds of CPU, better
        spent before the first training step than beside the steps after the first checkpoint."""
        with self._lock:
            if not self._closed and not multiprocessing.current_process().daemon:
                self._start()

    def _start(self) -> Connection:
        if self._conn is None:
            ctx = multiprocessing.get_context("spawn")     # no fork of a process with threads and CUDA state
            ours, theirs = ctx.Pipe(duplex=True)
            self._process = ctx.Process(target=_serve, args=(theirs,), name=self.name, daemon=True)
            self._process.start()
            theirs.close()                                  # so a dead writer reads as end of file here
            self._conn = ours
            log.info("checkpoint writer process %d started", self._process.pid)
        return self._conn

    def write(self, snap: Snapshot) -> list[str]:
        """Write ``snap`` into its folder in the writer process; returns the file names written."""
        snap.wait_copied()             # CUDA: the device-to-host copies have landed in the shared buffers
        with self._lock:
            if self._closed:
                raise CheckpointError(f"checkpoint writer is closed; step {snap.step} not written")
            if multiprocessing.current_process().daemon:      # may not have children: write here instead
                if not self._warned:
                    log.warning("a daemonic process cannot start the checkpoint writer process; checkpoints "
                                "are serialised in this process (slower steps after each checkpoint)")
                    self._warned = True
                return snap.write_here()
            conn = self._start()
            payload, new_structures, referenced = _dumps(dataclasses.replace(snap, writer=None), self.buffers,
                                                         self._held)
            try:
                conn.send((payload, self.buffers.take_new(), new_structures))
                status, result, times = conn.recv()
                # after an error the writer may hold more or less than this message referenced: send all again
                self._held = referenced if status == "done" else frozenset()
            except (EOFError, OSError, BrokenPipeError) as exc:
                how = _how_it_ended(self._process)
                self._stop(kill=True)
                raise CheckpointError(f"checkpoint writer process died ({how}) while writing step {snap.step} "
                                      f"into {snap.directory}; the next checkpoint starts a new one") from exc
        if status == "error":
            raise result
        snap.written_s, snap.written_cpu_s = times
        return result

    def close(self) -> None:
        """Wait for a write in progress, then stop and join the process (idempotent)."""
        got = self._lock.acquire(timeout=self.close_timeout_s)
        try:
            self._closed = True
            self._stop(kill=not got)
        finally:
            if got:
                self._lock.release()

    def _stop(self, kill: bool) -> None:
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        if process is None:
            return
        if not kill and conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(self.close_timeout_s)
        if process.is_alive():
            log.warning("checkpoint writer process %d did not stop; killing it", process.pid)
            process.kill()
            process.join()
        if conn is not None:
            conn.close()
        self.buffers.resend_all()     # a new process (after a crash) needs every buffer's handle again
        self._held = frozenset()      # ... and every structure
