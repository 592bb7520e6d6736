"""The streaming WebDataset reader with an exact, resumable cursor (``training-and-ops.md`` §2.1).

Order of one corpus, as a pure function of seeds and the shard sizes in the manifest:

1. per epoch, one permutation of the shards seeded by ``(seed, corpus, epoch)``, identical on every rank;
2. rank ``r`` takes ``order[r::W]``; its logical stream ``s`` takes every ``S``-th of those (``S`` =
   ``streams_per_rank``, normally the number of DataLoader workers);
3. within a stream, ``K`` shards are read at once and interleaved by a seeded RNG, then a shuffle buffer
   seeded by ``(seed, corpus, epoch, rank, stream)`` reorders samples;
4. every stream yields the same number of batches per epoch (the minimum over all ranks and streams of
   ``nsamples // batch_size``; the rest is dropped and counted), so all ranks take the same number of steps.

Rank-local batch ``b`` of an epoch belongs to stream ``b mod S``. Because the order is computed on sample
*ids* ``(shard, row)`` before any byte is read, the cursor is just ``(epoch, batches consumed)``: resuming
replays the id order without I/O, then re-reads only the shards still open or still holding samples in
the shuffle buffer, keeping raw bytes and decoding nothing that was already consumed.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from mplug2 import storage
from mplug2.data import defaults
from mplug2.data.dataset_index import DatasetIndex, ShardInfo

log = logging.getLogger(__name__)

__all__ = [
    "derive_seed", "StreamConfig", "Cursor", "EpochPlan", "RawBatch", "ShardReadError", "ShardDamagedError",
    "CorpusStream",
    "iter_tar_samples", "iter_shard_samples",
]

RawSample = dict[str, Any]          # {"__key__": str, "<field>": bytes, ...}
SampleId = tuple[int, int]          # (shard index in the manifest, row = position inside the tar)

# webdataset's and Ray's key/field split: the key is everything up to the first dot of the basename.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of parts, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class StreamConfig:
    """How one rank reads one corpus. Changing any field changes the sample order."""

    batch_size: int
    seed: int = 0
    streams_per_rank: int = 1        # logical streams per rank; DataLoader workers must divide it
    shards_in_flight: int = defaults.SHARDS_IN_FLIGHT   # K shards interleaved per stream
    shuffle_buffer: int = defaults.SHUFFLE_BUFFER       # samples; 1 disables shuffling
    read_attempts: int = defaults.READ_ATTEMPTS         # per shard, with exponential backoff
    retry_base_delay: float = 0.5    # seconds
    read_block_size: int = 8 << 20   # S3 read-ahead

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.streams_per_rank < 1 or self.shards_in_flight < 1 or self.shuffle_buffer < 1:
            raise ValueError(f"StreamConfig fields must be positive: {self}")


@dataclass(frozen=True)
class Cursor:
    """Position of one rank in one corpus: ``batches`` of ``epoch`` consumed by the trainer."""

    epoch: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cursor":
        return cls(int(d["epoch"]), int(d["batches"]))


@dataclass(frozen=True)
class EpochPlan:
    """Which shards every (rank, stream) reads in one epoch, and how many batches each yields."""

    epoch: int
    order: tuple[int, ...]              # shard indices, the epoch's permutation
    world_size: int
    streams_per_rank: int
    batches_per_stream: int
    batch_size: int
    num_samples: int

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_stream * self.streams_per_rank

    @property
    def dropped_samples(self) -> int:
        """Samples of this epoch no rank sees (remainders that keep all ranks in step)."""
        return self.num_samples - self.batches_per_rank * self.world_size * self.batch_size

    def shards_for(self, rank: int, stream: int) -> list[int]:
        return list(self.order[rank::self.world_size][stream::self.streams_per_rank])


@dataclass
class RawBatch:
    """One batch of undecoded samples, tagged with its place in the rank's order."""

    epoch: int
    index: int                          # rank-local batch index within the epoch
    samples: list[RawSample] = field(default_factory=list)
    # (shard name, reason) per sample of this batch's ids that could not be read (mplug2.data.damage)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)   # shard name of each sample (to name a bad one)


class ShardReadError(OSError):
    """A shard could not be read after all retries (the trainer restarts from its checkpoint)."""


class ShardDamagedError(ShardReadError, ValueError):
    """A shard's bytes are bad (not a tar, truncated, other counts than the index): retrying will not help,
    the stream skips its unreadable samples and counts them (:mod:`mplug2.data.damage`). A ValueError too:
    a shard that disagrees with its index breaks the contract."""


# --------------------------------------------------------------------------------------------- tar reading

def iter_tar_samples(fileobj: IO[bytes], url: str = "<tar>") -> Iterator[RawSample]:
    """Group the members of a WebDataset tar into samples of raw bytes (no decoding)."""
    current: RawSample | None = None
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            m = _KEY_RE.match(member.name)
            if not m:
                raise ValueError(f"{url}: member {member.name!r} has no '<key>.<field>' form")
            key, fld = m.group(1), m.group(2).lower()
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            if fld in current:
                raise ValueError(f"{url}: duplicate field {fld!r} in sample {key!r}")
            current[fld] = data
    if current is not None:
        yield current


def _open_stream(url: str, block_size: int) -> IO[bytes]:
    fs, path = storage.get_fs(url)
    if storage.is_remote(url):
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    return open(path, "rb")


def iter_shard_samples(shard: ShardInfo, *, attempts: int = 5, base_delay: float = 0.5,
                       block_size: int = 8 << 20) -> Iterator[RawSample]:
    """Samples of one shard, reopening (and skipping what was already yielded) on I/O errors.

    A shard whose sample count differs from the manifest raises: the order depends on exact counts.
    """
    yielded, failures, delay = 0, 0, base_delay
    while True:
        try:
            with _open_stream(shard.url, block_size) as f:
                for i, sample in enumerate(iter_tar_samples(f, shard.url)):
                    if i < yielded:
                        continue
                    if yielded >= shard.nsamples:
                        raise ShardDamagedError(f"{shard.url}: more samples than the manifest's {shard.nsamples}")
                    yield sample
                    yielded += 1
            break
        except ShardDamagedError:
            raise
        except FileNotFoundError as exc:
            raise ShardDamagedError(f"{shard.url}: shard listed in the manifest is missing") from exc
        except (OSError, EOFError, tarfile.TarError) as exc:
            failures += 1
            if failures >= attempts:
                # Bad bytes read back the same every time; an I/O error that outlived the retries is an
                # outage (the trainer restarts from its checkpoint), never a reason to skip data.
                kind = ShardDamagedError if isinstance(exc, (EOFError, tarfile.TarError)) else ShardReadError
                raise kind(f"{shard.url}: read failed {failures} times, last: {exc!r}") from exc
            log.warning("shard %s: read error after %d samples (%r); retry %d/%d in %.1fs",
                        shard.url, yielded, exc, failures, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    if yielded != shard.nsamples:
        raise ShardDamagedError(f"{shard.url}: {yielded} samples, the manifest says {shard.nsamples}")


# ----------------------------------------------------------------------------------------- order on ids

class _IdOrder:
    """The interleave + shuffle-buffer order of one stream, on sample ids only (no I/O).

    Interleave: up to K shards open; each pull picks an open shard uniformly and takes its next row; an
    exhausted shard is replaced in place by the next one. Buffer: filled to ``buffer_size``, then each output
    is a uniformly chosen element (swapped to the end and popped); at the end the buffer drains the same way.
    """

    def __init__(self, shards: list[tuple[int, int]], k: int, buffer_size: int, seed_interleave: int,
                 seed_buffer: int) -> None:
        self._pending = deque((s, n) for s, n in shards if n > 0)
        self._open: list[list[int]] = []           # [shard, next_row, n]
        self._rng_i, self._rng_b = random.Random(seed_interleave), random.Random(seed_buffer)
        self._buffer_size = buffer_size
        self.buffer: list[SampleId] = []
        self.rows_pulled: dict[int, int] = {}
        while self._pending and len(self._open) < k:
            self._open_next(None)

    def _open_next(self, slot: int | None) -> None:
        if self._pending:
            s, n = self._pending.popleft()
            entry = [s, 0, n]
            if slot is None:
                self._open.append(entry)
            else:
                self._open[slot] = entry
        elif slot is not None:
            del self._open[slot]

    def _pull(self) -> SampleId | None:
        if not self._open:
            return None
        i = self._rng_i.randrange(len(self._open))
        entry = self._open[i]
        sid = (entry[0], entry[1])
        entry[1] += 1
        self.rows_pulled[entry[0]] = entry[1]
        if entry[1] == entry[2]:
            self._open_next(i)
        return sid

    def __iter__(self) -> "_IdOrder":
        return self

    def __next__(self) -> SampleId:
        buf = self.buffer
        while len(buf) < self._buffer_size:
            sid = self._pull()
            if sid is None:
                break
            buf.append(sid)
        if not buf:
            raise StopIteration
        j = self._rng_b.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        return buf.pop()


class _Fetcher:
    """Raw bytes for ids in the order `_IdOrder` emits them, reading each shard once, sequentially.

    Rows read on the way to a requested row are cached (they sit in the shuffle buffer) unless they were
    consumed before a resume point (``emitted``), in which case they are dropped without decoding.
    """

    def __init__(self, shards: dict[int, ShardInfo], cfg: StreamConfig,
                 consumed: tuple[dict[int, int], set[SampleId]] | None = None) -> None:
        self._shards, self._cfg = shards, cfg
        self._readers: dict[int, tuple[Iterator[RawSample], list[int]]] = {}
        self._cache: dict[SampleId, RawSample] = {}
        self._pulled_at_resume, self._buffer_at_resume = consumed or ({}, set())
        self.shards_opened = 0
        self.damaged: dict[int, str] = {}   # shard -> why its rows from the damage on cannot be read

    def _consumed_before_resume(self, sid: SampleId) -> bool:
        return sid[1] < self._pulled_at_resume.get(sid[0], 0) and sid not in self._buffer_at_resume

    def get(self, sid: SampleId) -> RawSample | None:
        """The sample, or None when its shard is damaged at or before this row (the caller counts it).
        Damage reads back the same on every pass, so a resumed run skips exactly the same samples."""
        hit = self._cache.pop(sid, None)
        if hit is not None:
            return hit
        if sid[0] in self.damaged:
            return None
        try:
            return self._read(sid)
        except ShardDamagedError as exc:
            self.damaged[sid[0]] = str(exc).replace(self._shards[sid[0]].url + ": ", "")
            self._readers.pop(sid[0], None)
            return None

    def _read(self, sid: SampleId) -> RawSample:
        shard = sid[0]
        if shard not in self._readers:
            info = self._shards[shard]
            it = iter_shard_samples(info, attempts=self._cfg.read_attempts, base_delay=self._cfg.retry_base_delay,
                                    block_size=self._cfg.read_block_size)
            self._readers[shard] = (it, [0])
            self.shards_opened += 1
        it, pos = self._readers[shard]
        while True:
            row = pos[0]
            try:
                sample = next(it)
            except StopIteration:
                raise ShardDamagedError(f"{self._shards[shard].url}: ended before row {sid[1]} "
                                        f"(manifest says {self._shards[shard].nsamples})") from None
            pos[0] += 1
            if pos[0] == self._shards[shard].nsamples:
                self._finish(shard)
            if row == sid[1]:
                return sample
            if not self._consumed_before_resume((shard, row)):
                self._cache[(shard, row)] = sample

    def _finish(self, shard: int) -> None:
        it, _ = self._readers.pop(shard)
        try:
            for _extra in it:  # drives the count check at the end of the tar
                pass
        except ShardDamagedError as exc:  # every row was read: nothing to skip, but say so
            log.warning("shard %s: %s (all %d indexed samples were read)", self._shards[shard].url, exc,
                        self._shards[shard].nsamples)

    def close(self) -> None:
        for it, _ in self._readers.values():
            it.close()
        self._readers.clear()
        self._cache.clear()


# -------------------------------------------------------------------------------------------- the stream

class CorpusStream:
    """The order of one corpus for one rank; iterate with :meth:`iter_batches` inside each loader worker."""

    def __init__(self, index: DatasetIndex, corpus: str, cfg: StreamConfig, *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        need = cfg.streams_per_rank * world_size
        if len(index.shards) < need:
            raise ValueError(
                f"corpus {corpus!r} has {len(index.shards)} shards but needs at least streams_per_rank "
                f"({cfg.streams_per_rank}) x world_size ({world_size}) = {need}; with fewer, some loader workers "
                "get no shard and ranks hang (webdataset#188). Write more, smaller shards or use fewer workers.")
        self.index, self.corpus, self.cfg = index, corpus, cfg
        self.rank, self.world_size = rank, world_size
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            order = list(range(len(self.index.shards)))
            random.Random(derive_seed(self.cfg.seed, self.corpus, epoch, "shards")).shuffle(order)
            S, W, B = self.cfg.streams_per_rank, self.world_size, self.cfg.batch_size
            counts = [sum(self.index.shards[i].nsamples for i in order[r::W][s::S]) for r in range(W) for s in range(S)]
            per_stream = min(counts) // B
            if per_stream == 0:
                raise ValueError(
                    f"corpus {self.corpus!r} epoch {epoch}: a loader stream gets only {min(counts)} samples, fewer "
                    f"than batch_size {B}; use a smaller batch, fewer workers/ranks or more data")
            plan = EpochPlan(epoch, tuple(order), W, S, per_stream, B, self.index.num_samples)
            if plan.dropped_samples:
                log.info("corpus %s epoch %d: %d batches/rank, %d samples dropped to keep ranks in step",
                         self.corpus, epoch, plan.batches_per_rank, plan.dropped_samples)
            if len(self._plans) > 8:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return self._plans[epoch]

    def shard_order(self, epoch: int) -> list[str]:
        """Shard names in the epoch's permutation (the same on every rank)."""
        return [self.index.shards[i].name for i in self.plan(epoch).order]

    def normalize(self, cursor: Cursor) -> Cursor:
        """Move a cursor sitting at the end of an epoch to the start of the next one."""
        if cursor.batches > self.plan(cursor.epoch).batches_per_rank:
            raise ValueError(f"cursor {cursor} is beyond epoch {cursor.epoch}'s "
                             f"{self.plan(cursor.epoch).batches_per_rank} batches (a different dataset or config?)")
        if cursor.batches == self.plan(cursor.epoch).batches_per_rank:
            return Cursor(cursor.epoch + 1, 0)
        return cursor

    def cursor_after(self, epoch: int, index: int) -> Cursor:
        """The cursor once batch ``index`` of ``epoch`` has been consumed."""
        return self.normalize(Cursor(epoch, index + 1))

    def _id_order(self, epoch: int, stream: int) -> tuple[_IdOrder, list[int]]:
        plan = self.plan(epoch)
        shard_ids = plan.shards_for(self.rank, stream)
        sizes = [(i, self.index.shards[i].nsamples) for i in shard_ids]
        base = (self.cfg.seed, self.corpus, epoch, self.rank, stream)
        order = _IdOrder(sizes, self.cfg.shards_in_flight, self.cfg.shuffle_buffer,
                         derive_seed(*base, "interleave"), derive_seed(*base, "buffer"))
        return order, shard_ids

    def _stream_batches(self, epoch: int, stream: int, skip_batches: int
                        ) -> Iterator[tuple[list[RawSample], list[str], list[tuple[str, str]]]]:
        plan, B = self.plan(epoch), self.cfg.batch_size
        order, shard_ids = self._id_order(epoch, stream)
        consumed = None
        if skip_batches:
            for _ in range(skip_batches * B):
                next(order)
            consumed = (dict(order.rows_pulled), set(order.buffer))
        fetcher = _Fetcher({i: self.index.shards[i] for i in shard_ids}, self.cfg, consumed)
        try:
            for _ in range(skip_batches, plan.batches_per_stream):
                samples, names, skipped = [], [], []
                for sid in (next(order) for _ in range(B)):
                    sample = fetcher.get(sid)
                    if sample is None:
                        skipped.append((self.index.shards[sid[0]].name, fetcher.damaged[sid[0]]))
                    else:
                        samples.append(sample)
                        names.append(self.index.shards[sid[0]].name)
                yield samples, names, skipped
        finally:
            fetcher.close()

    def iter_batches(self, start: Cursor = Cursor(), *, worker: int = 0, num_workers: int = 1) -> Iterator[RawBatch]:
        """Endless raw batches for one DataLoader worker, from ``start`` on, across epochs.

        With ``num_workers`` in-order workers, the trainer's j-th batch after ``start`` comes from worker
        ``j mod num_workers``; worker ``w`` therefore yields the rank-local indices ``b`` with
        ``b ≡ start.batches + w (mod num_workers)``, which is consistent across epochs because every epoch
        has a multiple of ``streams_per_rank`` batches and ``num_workers`` divides it.
        """
        S, P = self.cfg.streams_per_rank, num_workers
        if S % P:
            raise ValueError(f"DataLoader workers ({P}) must divide streams_per_rank ({S})")
        start = self.normalize(start)
        residue = (start.batches + worker) % P
        epoch, first = start.epoch, start.batches
        while True:
            total = self.plan(epoch).batches_per_rank
            b = first + ((residue - first) % P)
            gens: dict[int, Iterator[tuple[list[RawSample], list[str], list[tuple[str, str]]]]] = {}
            try:
                while b < total:
                    s, local = b % S, b // S
                    if s not in gens:
                        gens[s] = self._stream_batches(epoch, s, local)
                    samples, names, skipped = next(gens[s])
                    yield RawBatch(epoch, b, samples, skipped, names)
                    b += P
            finally:
                for g in gens.values():
                    g.close()
            epoch, first = epoch + 1, 0
