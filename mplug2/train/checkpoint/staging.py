"""Staging buffers: the CPU memory a checkpoint's tensors are copied into on the training thread.

One concept: where a snapshot's tensors land and how they get there cheaply. Buffers are allocated once and
reused (shared memory for the writer process, pinned on CUDA); the copies of a snapshot are batched into one
``torch._foreach_copy_``, the stable part (parameters, optimizer state) optionally in a thread beside the next
forward and backward (:class:`BackgroundCopy`); and the walk that finds a model's tensors is done once per run
and then only checked (:class:`ModelPlan`), because on the training thread that Python walk, not the copy,
was the larger part of a snapshot (docs/benchmarks.md, issue 13).
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import weakref
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, is_
from typing import Any, Iterable

import torch

from mplug2.side_threads import single_threaded_torch

__all__ = ["BackgroundCopy", "ModelPlan", "OptimizerPlan", "SharedSegments", "StagingBuffers", "segment_view",
           "unwrap_model"]


_ATOMS = frozenset({int, float, bool, str, bytes, type(None)})    # immutable: a container of them copies shallowly
# read from many modules or tensors at once by map(): C-level, no Python frame per object
_PARAMETERS, _BUFFERS, _CHILDREN = (attrgetter(a) for a in ("_parameters", "_buffers", "_modules"))
_NON_PERSISTENT = attrgetter("_non_persistent_buffers_set")
_SD_HOOKS, _SD_PRE_HOOKS = attrgetter("_state_dict_hooks"), attrgetter("_state_dict_pre_hooks")
_SHAPE, _DTYPE, _IS_CUDA = attrgetter("shape"), attrgetter("dtype"), attrgetter("is_cuda")


SegmentView = tuple[int, int, torch.dtype, tuple[int, ...]]    # (segment, byte offset, dtype, shape)

# a new segment holds a quarter of the staging memory allocated so far, within these bounds (a larger buffer
# gets a segment of its own size): few segments for a large model, little unused tail for a small one
SEGMENT_MIN_BYTES = 8 << 20
SEGMENT_MAX_BYTES = 256 << 20
_ALIGN = 64                     # byte alignment of each buffer in a segment (any dtype's view, SIMD copies)


def segment_view(segment: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                 own_storage: bool = False) -> torch.Tensor:
    """The buffer at ``offset`` of a uint8 ``segment``, as ``dtype`` and ``shape`` (here and in the writer).

    ``own_storage``: a tensor whose storage is exactly the buffer's bytes, still in the segment's memory. A
    plain view's storage is the whole segment, and ``torch.save`` writes a tensor's whole storage: the tiny
    model's ``trainer_state.pt`` was 24.6 MB for 16.4 MB of optimizer state, the rest of the segments
    (model weights, unused tails) written along."""
    nbytes = math.prod(shape) * dtype.itemsize
    if own_storage and nbytes:
        return torch.frombuffer(segment.numpy()[offset:offset + nbytes], dtype=torch.uint8).view(dtype).view(shape)
    return segment[offset:offset + nbytes].view(dtype).view(shape)


class SharedSegments:
    """Shared memory for the staging buffers, carved from a few segments.

    One segment per buffer (``share_memory_()`` on each) cost one open file descriptor per tensor here and
    one handle per tensor to the writer. The tiny model with its AdamW state has ~1,500 tensors; Base
    pretraining has ~5,000, past the common soft ``ulimit -n`` of 1024. The tiny model's first checkpoint
    also spent 0.3 s of its step allocating them and ~4 s handing them over. Carved, a checkpoint holds one
    descriptor and one handle per segment: ~5 for the tiny model, ~25 for Base. The last segment's unused
    tail is the price (``share_memory_`` commits a segment whole): at most 8 MiB or a quarter of the rest.
    Buffers for CUDA sources come from segments pinned whole (one ``cudaHostRegister`` per segment)."""

    def __init__(self) -> None:
        self.segments: list[torch.Tensor] = []            # uint8, shared
        self._used: list[int] = []                        # per segment: first free byte
        self._pinned: list[bool] = []
        self._sent = 0                                    # segments handed over by take_new()

    def carve(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...], pinned: bool) -> SegmentView:
        """Room for a buffer: the first segment (of the same pinning) with space left, else a new one."""
        for index, segment in enumerate(self.segments):
            offset = -(-self._used[index] // _ALIGN) * _ALIGN
            if self._pinned[index] == pinned and offset + nbytes <= segment.numel():
                break
        else:
            allocated = sum(segment.numel() for segment in self.segments)
            size = max(nbytes, min(SEGMENT_MAX_BYTES, max(SEGMENT_MIN_BYTES, allocated // 4)))
            index, offset = self._new_segment(size, pinned), 0
        self._used[index] = offset + nbytes
        return index, offset, dtype, shape

    def _new_segment(self, nbytes: int, pinned: bool) -> int:
        segment = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        if pinned:                                    # pin the shared pages in place (pin_memory() would copy)
            import torch.cuda._pin_memory_utils as pin

            pin.pin_memory(segment.data_ptr(), nbytes)
            weakref.finalize(segment, pin.unpin_memory, segment.data_ptr())
        self.segments.append(segment)
        self._used.append(0)
        self._pinned.append(pinned)
        return len(self.segments) - 1

    def view(self, spec: SegmentView) -> torch.Tensor:
        # own storage (torch.save writes only its bytes) unless pinned: a pinned segment's views keep its storage
        return segment_view(self.segments[spec[0]], *spec[1:], own_storage=not self._pinned[spec[0]])

    def take_new(self) -> dict[int, torch.Tensor]:
        new = {i: self.segments[i] for i in range(self._sent, len(self.segments))}
        self._sent = len(self.segments)
        return new

    def resend_all(self) -> None:
        self._sent = 0


class StagingBuffers:
    """CPU tensors a snapshot copies into, kept from one checkpoint to the next (no allocation, no page
    faults on the step; pinned memory for asynchronous device-to-host copies when the source is on CUDA).

    ``shared=True`` carves them from shared memory (:class:`SharedSegments`, once; pinned in place on CUDA,
    as torch DCP's process-based async save does) so a writer process (:mod:`.writer`) reads them without a
    copy or a pickle: :meth:`take_new` hands it what was allocated since the last hand-off, :meth:`key_of`
    names the rest.

    Reuse is safe only once the previous snapshot's files are written: the training loop takes the next
    snapshot after waiting for the previous checkpoint (one in flight at most)."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self._buffers: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}               # id(buffer) -> key, for the writer's references
        self._segments = SharedSegments()
        self._specs: dict[str, SegmentView] = {}      # key -> where its shared buffer lies
        self._new: dict[str, SegmentView] = {}        # allocated since the last take_new()
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])   # (buffers, sources)
        self._stable: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])    # ... unchanged until the
        #                                                                          next optimizer step
        self._plan: ModelPlan | None = None
        self._optimizer_plans: dict[str, OptimizerPlan | None] = {}
        # the plans' staged structures (id -> key, object held so that its id stays its own): a writer process
        # keeps each one it was sent, and later hand-offs name it instead of pickling it again
        self._structures: dict[int, tuple[str, Any]] = {}
        self._structure_count = 0

    def stage_model(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Register copies of every tensor of ``model``'s state dict, each storage once; returns the staged
        tensors by name and the tied names as aliases of the first. The walk is planned once
        (:class:`ModelPlan`) and replayed while the plan holds."""
        plan = self._plan
        if plan is not None and plan.model is model and plan.holds():
            return plan.stage(self)
        if plan is not None:
            self._forget_structure(plan.tensors)
        plan = ModelPlan(model, self)                      # registers this snapshot's copies as it walks
        self._plan = plan if plan.replayable else None
        if self._plan is not None:
            self._add_structure(plan.tensors)
        return plan.tensors, dict(plan.aliases)

    def stage_optimizer(self, key: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` staged as :meth:`stage` with ``stable`` stages it (same keys, same
        buffers); the walk over the per-parameter state is planned once (:class:`OptimizerPlan`) and replayed
        while the plan holds."""
        state = optimizer.state_dict()
        if not isinstance(state.get("state"), dict):          # not torch's layout: walked every time
            return self.stage(key, state, stable=True)
        plan = self._optimizer_plans.get(key)
        if plan is not None and plan.optimizer is optimizer and plan.holds(state["state"]):
            per_param = plan.stage(self)       # the plan's own, shared by its snapshots as the buffers are
        else:
            if plan is not None:
                self._forget_structure(plan.staged)
            plan = OptimizerPlan(optimizer, state["state"], self, key)
            self._optimizer_plans[key] = plan if plan.replayable else None
            if plan.replayable:
                self._add_structure(plan.staged)
            per_param = plan.staged
        return {k: per_param if k == "state" else self.stage(f"{key}/{k}", v, stable=True) for k, v in state.items()}

    def _mark(self) -> tuple[int, int]:
        return len(self._pending[0]), len(self._stable[0])

    def registered_since(self, mark: tuple[int, int]) -> tuple[tuple[list, list], tuple[list, list]]:
        """The (pending, stable) copies registered since ``mark`` (:meth:`_mark`): (buffers, sources) each."""
        p, s = mark
        return ((self._pending[0][p:], self._pending[1][p:]), (self._stable[0][s:], self._stable[1][s:]))

    def register(self, pending: tuple[list, list], stable: tuple[list, list]) -> None:
        """Register copies again, as :meth:`registered_since` returned them (buffers already allocated)."""
        for group, (dsts, srcs) in ((self._pending, pending), (self._stable, stable)):
            group[0].extend(dsts)
            group[1].extend(srcs)

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
            if key in self._buffers:
                self._keys.pop(id(self._buffers[key]), None)
                self._specs.pop(key, None)
            buf = self._buffers[key] = self._allocate(t, key)
            if key in self._specs:
                self._keys[id(buf)] = key
                self._new[key] = self._specs[key]
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
        on_cuda = any(map(_IS_CUDA, srcs))
        later = background and self._stable[0] and not on_cuda
        if later:
            dsts, srcs = self._pending
            later_copy = BackgroundCopy(*self._stable)
        self._pending, self._stable = ([], []), ([], [])
        if dsts:
            torch._foreach_copy_(dsts, srcs, non_blocking=on_cuda)
        return later_copy if later else None

    def _allocate(self, t: torch.Tensor, key: str) -> torch.Tensor:
        if not self.shared or t.numel() == 0:         # an empty tensor has no memory to share: sent by value
            return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        spec = self._segments.carve(t.numel() * t.element_size(), t.dtype, tuple(t.shape), pinned=t.is_cuda)
        self._specs[key] = spec
        return self._segments.view(spec)

    def key_of(self, t: torch.Tensor) -> str | None:
        """The key of a shared buffer (None for any other tensor)."""
        return self._keys.get(id(t))

    def structure_key(self, obj: Any) -> str | None:
        """The key of a plan's staged structure (the model's name -> buffer dict, an optimizer's per-parameter
        state): the same object, unchanged, in every snapshot while its plan holds. None for anything else."""
        entry = self._structures.get(id(obj))
        return entry[0] if entry is not None else None

    def _add_structure(self, obj: Any) -> None:
        self._structure_count += 1
        self._structures[id(obj)] = (f"structure/{self._structure_count}", obj)

    def _forget_structure(self, obj: Any) -> None:
        self._structures.pop(id(obj), None)

    def take_new(self) -> tuple[dict[int, torch.Tensor], dict[str, SegmentView]]:
        """What a writer process has not been handed yet: the shared segments created since the last call (one
        handle each) and where the buffers allocated (or re-allocated for a new shape) since then lie in them
        (:func:`segment_view` rebuilds each there)."""
        new, self._new = self._new, {}
        return self._segments.take_new(), new

    def resend_all(self) -> None:
        """Hand every segment and buffer over again at the next :meth:`take_new` (to a new writer process)."""
        self._segments.resend_all()
        self._new = dict(self._specs)

    def stage(self, key: str, obj: Any, stable: bool = False) -> Any:
        """A copy of ``obj`` (nested dicts / lists / tuples) whose tensors live in the buffers, the rest
        deep-copied (``stable``: as in :meth:`copy`, for every tensor in it)."""
        if isinstance(obj, torch.Tensor):
            return self.copy(key, obj, stable)
        if isinstance(obj, dict):
            return {k: self.stage(f"{key}/{k}", v, stable) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            if _ATOMS.issuperset(map(type, obj)):        # e.g. a param group's 500 parameter ids: one copy
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
        single_threaded_torch()      # an OpenMP team here would slow every step of the training thread
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


def _plain_state_dict(m: torch.nn.Module) -> bool:
    """``m.state_dict()`` is exactly its parameters and persistent buffers (no hook, no override, no extra
    state): what its tensors are then follows from its own dictionaries."""
    cls, base = type(m), torch.nn.Module
    return (not m._state_dict_hooks and not m._state_dict_pre_hooks and cls.state_dict is base.state_dict
            and cls._save_to_state_dict is base._save_to_state_dict
            and getattr(cls, "get_extra_state", base.get_extra_state) is base.get_extra_state)


@dataclass
class _Structure:
    """What :class:`ModelPlan` checks, as flat lists (one entry per module, dictionary or entry)."""

    types: list[type]
    dicts: list[dict]                        # every module's parameters, then buffers, then children
    sizes: list[int]
    names: list[str]                         # their keys, in order
    values: list[Any]                        # their values, in order (compared by identity)
    non_persistent: list[frozenset]
    hooks: list[int]                         # state-dict hooks, then pre-hooks, per module


def _same_objects(live: Iterable[Any], found: list[Any]) -> bool:
    """``live`` is ``found`` element for element, by identity (a replaced tensor of equal value shows; ``==``
    would compare a one-element tensor's value). Compares C-level: no Python call per element."""
    live = live if isinstance(live, list) else list(live)
    return len(live) == len(found) and all(map(is_, live, found))


def _module_dicts(modules: list[torch.nn.Module]) -> list[dict]:
    """Every module's parameter dictionary, then every buffer dictionary, then every child dictionary."""
    return [*map(_PARAMETERS, modules), *map(_BUFFERS, modules), *map(_CHILDREN, modules)]


def _hook_counts(modules: list[torch.nn.Module]) -> list[int]:
    """Every module's number of state-dict hooks, then of state-dict pre-hooks."""
    return [*map(len, map(_SD_HOOKS, modules)), *map(len, map(_SD_PRE_HOOKS, modules))]


def _where(sources: list[torch.Tensor]) -> tuple[list[int], list[torch.Size], list[torch.dtype]]:
    """Where each tensor's memory is, its shape and dtype (a ``.data`` swap, a re-tie or a resize shows)."""
    return list(map(torch.Tensor.data_ptr, sources)), list(map(_SHAPE, sources)), list(map(_DTYPE, sources))


class ModelPlan:
    """Where a model's checkpointed tensors are: its ``state_dict(keep_vars=True)`` entries, tied names as
    aliases of the first, and their staging buffers, found by one walk of the module tree.

    Later snapshots check the plan instead of walking again (:meth:`holds`): every module is of the same class
    and holds the same parameter, buffer and child dictionaries with the same objects under the same names, over
    the same memory (``data_ptr``, shape, dtype: a ``.data`` swap or a re-tie shows), with the same
    non-persistent buffers and no state-dict hook added. The check runs as C-level ``map`` passes over flat
    lists, not a Python loop per module: for the tiny model's 484 modules ~1.0 ms instead of ~1.4 ms right after
    a training step (0.6 ms with warm caches; a walk is ~3.7 ms). A model whose state dict is not plain (hooks,
    an override, extra state) gets no plan: it is walked every time."""

    def __init__(self, model: torch.nn.Module, buffers: StagingBuffers) -> None:
        self.model = model
        self._modules = list(model.modules())
        self._shape = self._structure(self._modules)
        self.tensors: dict[str, torch.Tensor] = {}         # name -> staging buffer
        self.aliases: dict[str, str] = {}
        sources: list[torch.Tensor] = []
        mark = buffers._mark()
        seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            sources.append(t)
            # the same memory, shape and dtype: a tied name (data_ptr = storage start + offset)
            ident = (t.data_ptr() if t.numel() else id(t), tuple(t.shape), t.dtype)
            if ident in seen:
                self.aliases[name] = seen[ident]
                continue
            seen[ident] = name
            # parameters are ``stable``: only the optimizer step and the momentum update after it change them
            self.tensors[name] = buffers.copy(f"model/{name}", t,
                                              stable=t.numel() > 0 and isinstance(t, torch.nn.Parameter))
        self._sources = sources                                   # held: their ids stay theirs
        self._memory = _where(sources)
        self._copies = buffers.registered_since(mark)             # (pending, stable) pairs, replayed

    @property
    def replayable(self) -> bool:
        """Every module's state dict is plain: checking the plan can stand in for walking again."""
        return all(_plain_state_dict(m) for m in self._modules)

    @staticmethod
    def _structure(modules: list[torch.nn.Module]) -> _Structure:
        dicts = _module_dicts(modules)
        return _Structure(
            types=list(map(type, modules)), dicts=dicts, sizes=list(map(len, dicts)),
            names=list(chain.from_iterable(dicts)), values=list(chain.from_iterable(map(dict.values, dicts))),
            non_persistent=list(map(frozenset, map(_NON_PERSISTENT, modules))), hooks=_hook_counts(modules))

    def holds(self) -> bool:
        """The model's tensors are still the ones this plan found, where it found them."""
        modules, shape = self._modules, self._shape
        if not (_same_objects(map(type, modules), shape.types)
                and _same_objects(_module_dicts(modules), shape.dicts)):
            return False
        dicts = shape.dicts                  # the very dictionaries found: now their contents
        return (list(map(len, dicts)) == shape.sizes and list(chain.from_iterable(dicts)) == shape.names
                and _same_objects(chain.from_iterable(map(dict.values, dicts)), shape.values)
                and list(map(_NON_PERSISTENT, modules)) == shape.non_persistent
                and _hook_counts(modules) == shape.hooks and _where(self._sources) == self._memory)

    def stage(self, buffers: StagingBuffers) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Register this snapshot's copies (as :meth:`StagingBuffers.copy` would); the staged tensors by name (the
        plan's own dict, shared by its snapshots as the buffers in it are: read, never changed)."""
        buffers.register(*self._copies)
        return self.tensors, dict(self.aliases)


class OptimizerPlan:
    """Where an optimizer's per-parameter state tensors are (``state_dict()["state"]``) and their staging
    buffers, found by one walk; later snapshots check that every entry is still the same tensor over the same
    memory (:meth:`holds`) and replay the copies.

    Optimizers update that state in place (AdamW's moments and step count), and walking it was, once the
    model's walk was planned, the larger part of a snapshot on the training thread: ~1,500 entries for the
    tiny model, ~3 ms (docs/benchmarks.md, issue 13). A replaced tensor (``load_state_dict``, a new
    parameter's first step) shows in the check and the next snapshot walks again. A state holding anything
    but tensors (an optimizer that counts its steps in a Python int) gets no plan: it is walked every time."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: dict[Any, Any], buffers: StagingBuffers,
                 key: str) -> None:
        self.optimizer = optimizer
        mark = buffers._mark()
        self.staged: dict[Any, Any] = buffers.stage(f"{key}/state", state, stable=True)
        self._copies = buffers.registered_since(mark)
        entries = list(state.values())
        self.replayable = all(isinstance(e, dict) and all(isinstance(v, torch.Tensor) for v in e.values())
                              for e in entries)
        self._indices = list(state)
        self._sizes = list(map(len, entries)) if self.replayable else []
        self._names = list(chain.from_iterable(entries)) if self.replayable else []
        self._sources = list(chain.from_iterable(map(dict.values, entries))) if self.replayable else []
        self._memory = _where(self._sources)                      # _sources held: their ids stay theirs

    def holds(self, state: dict[Any, Any]) -> bool:
        """``state`` holds the very tensors this plan found, under the same keys, where it found them."""
        entries = list(state.values())
        if list(state) != self._indices or not all(map(isinstance, entries, repeat(dict))):
            return False
        return (list(map(len, entries)) == self._sizes and list(chain.from_iterable(entries)) == self._names
                and _same_objects(chain.from_iterable(map(dict.values, entries)), self._sources)
                and _where(self._sources) == self._memory)

    def stage(self, buffers: StagingBuffers) -> dict[Any, Any]:
        """Register this snapshot's copies (as :meth:`StagingBuffers.stage` would); the staged state."""
        buffers.register(*self._copies)
        return self.staged
