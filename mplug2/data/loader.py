"""A torch ``DataLoader`` for one corpus on one rank, with an exact cursor (``state_dict``/``load_state_dict``).

Workers produce whole batches (``batch_size=None`` on the DataLoader), so the in-order loader hands the
trainer rank-local batch ``b`` from worker ``b mod num_workers``; each batch carries ``(epoch, index)`` and
the loader's cursor is set from the batch the trainer actually received, never from what was prefetched.

    loader = build_loader(LoaderConfig(prefix="s3://bucket/corpora/cc3m/train", corpus="cc3m",
                                       batch_size=64, num_workers=4), rank=rank, world_size=world)
    loader.load_state_dict(ckpt_state)          # optional: resume
    for batch in loader: ...                    # endless; loader.state_dict() after any batch
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mplug2 import storage
from mplug2.data import defaults
from mplug2.data.augment import TensorTransform
from mplug2.data.collate import BatchBuilder, Tokenize
from mplug2.data.damage import DamageLedger
from mplug2.data.dataset_index import DatasetIndex, load_index
from mplug2.data.handoff import small_by_value
from mplug2.data.stream import CorpusStream, Cursor, EpochPlan, StreamConfig, derive_seed
from mplug2.data.transforms import TransformConfig, VideoTransform

log = logging.getLogger(__name__)

__all__ = ["LoaderConfig", "CorpusDataset", "CorpusLoader", "build_loader"]

STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderConfig:
    prefix: str                          # dataset prefix (local folder or s3://...)
    corpus: str                          # name; part of every seed
    batch_size: int                      # per rank (micro-batch)
    split: str = "train"
    num_workers: int = 2                 # DataLoader processes; 0 = in the trainer process
    streams_per_rank: int | None = None  # logical streams (default: max(1, num_workers)); fixed for a run
    seed: int = 0
    train: bool = True
    res: int = 224
    num_frames: int = 1                  # frames per sample; 1 for image corpora
    max_words: int = 30
    max_length: int = defaults.MAX_TEXT_LEN   # tokens
    tokenizer: str | None = None         # mplug2.tokenizer.load_tokenizer path (None = bert-base-uncased, "tiny")
    shards_in_flight: int = defaults.SHARDS_IN_FLIGHT
    shuffle_buffer: int = defaults.SHUFFLE_BUFFER
    randaug: bool = defaults.AUGMENT
    crop_scale: tuple[float, float] = defaults.CROP_SCALE
    # cpu: workers return normalised float pixels; device: uint8 pixels + the drawn ops, finished on the
    # training device by mplug2.data.augment.finish_batch (train loaders only; eval is always "cpu")
    augment_on: str = defaults.AUGMENT_ON
    # the per-frame PIL reference transforms (mplug2.data.transforms.VideoTransform) instead of the tensor
    # path: kept for comparisons (bench loader --path pil, the distribution test)
    pil_transforms: bool = False
    prefetch_factor: int = defaults.PREFETCH_FACTOR
    # None: "forkserver" for s3:// corpora (forking a process that holds s3fs/aiohttp connections and its
    # event-loop thread is unsafe), else the platform default; use "forkserver" inside Ray actors.
    multiprocessing_context: str | None = None
    pin_memory: bool = False
    read_attempts: int = defaults.READ_ATTEMPTS
    label_key: str = "label"             # json field with the class label (classification corpora)
    max_bad_samples: int | None = defaults.MAX_BAD_SAMPLES  # damaged samples skipped before the run fails (None: no limit)
    max_bad_fraction: float = defaults.MAX_BAD_FRACTION  # ... or this fraction of the samples asked for (mplug2.data.damage)

    def __post_init__(self) -> None:
        if self.augment_on not in defaults.AUGMENT_ON_CHOICES:
            raise ValueError(f"augment_on must be one of {defaults.AUGMENT_ON_CHOICES}, got {self.augment_on!r}")
        if self.augment_on == "device" and self.pil_transforms:
            raise ValueError("augment_on='device' needs the tensor transforms (pil_transforms=False)")

    @property
    def streams(self) -> int:
        return self.streams_per_rank or max(1, self.num_workers)


class CorpusDataset(IterableDataset):
    """Endless batches of one corpus for one rank, starting at ``start``; picklable for worker processes."""

    def __init__(self, stream: CorpusStream, builder: BatchBuilder, start: Cursor) -> None:
        super().__init__()
        self.stream, self.builder, self.start = stream, builder, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in self.stream.iter_batches(self.start, worker=worker, num_workers=num_workers):
            batch = self.builder(raw)
            yield small_by_value(batch) if info is not None else batch     # a worker's: small tensors by value


class CorpusLoader:
    """Iterate batches of one corpus; the cursor counts batches the trainer received."""

    def __init__(self, cfg: LoaderConfig, *, rank: int, world_size: int, index: DatasetIndex | None = None,
                 tokenize: Tokenize | None = None) -> None:
        if cfg.num_workers and cfg.streams % cfg.num_workers:
            raise ValueError(f"num_workers ({cfg.num_workers}) must divide streams_per_rank ({cfg.streams})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.index = index or load_index(cfg.prefix, cfg.split)
        stream_cfg = StreamConfig(batch_size=cfg.batch_size, seed=cfg.seed, streams_per_rank=cfg.streams,
                                  shards_in_flight=cfg.shards_in_flight, shuffle_buffer=cfg.shuffle_buffer,
                                  read_attempts=cfg.read_attempts)
        self.stream = CorpusStream(self.index, cfg.corpus, stream_cfg, rank=rank, world_size=world_size)
        tcfg = TransformConfig(res=cfg.res, train=cfg.train, randaug=cfg.randaug, crop_scale=cfg.crop_scale)
        transform = (VideoTransform(tcfg) if cfg.pil_transforms
                     else TensorTransform(tcfg, augment_on=cfg.augment_on))
        self.builder = BatchBuilder(cfg.corpus, transform, num_frames=cfg.num_frames, seed=cfg.seed,
                                    max_words=cfg.max_words, max_length=cfg.max_length, tokenize=tokenize,
                                    tokenizer_path=cfg.tokenizer, label_key=cfg.label_key)
        self.cursor = Cursor()
        self.damage = DamageLedger(cfg.corpus, cfg.max_bad_samples, cfg.max_bad_fraction)
        self.stream.plan(0)   # fail at start-up, not in a worker, if shards are too small for the batch
        self._it: Iterator[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None

    # ---------------------------------------------------------------------------------------- iteration
    def _make_iter(self) -> Iterator[dict[str, Any]]:
        ds = CorpusDataset(self.stream, self.builder, self.cursor)
        kw: dict[str, Any] = {}
        if self.cfg.num_workers:
            ctx = self.cfg.multiprocessing_context or ("forkserver" if storage.is_remote(self.cfg.prefix) else None)
            kw = dict(prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context=ctx)
        # Our order and augmentation never use torch's global RNG, but a DataLoader iterator draws its base
        # seed from it unless given a generator. That draw happens lazily (first batch of each corpus), so
        # it would shift the trainer's RNG stream (masking, negatives) differently after a resume.
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.cfg.corpus, "dataloader"))
        self._loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                  pin_memory=self.cfg.pin_memory, generator=generator, **kw)
        return iter(self._loader)

    def __iter__(self) -> "CorpusLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._make_iter()
        while True:
            batch = next(self._it)
            expected = self.stream.normalize(self.cursor)
            got = Cursor(batch["epoch"], batch["index"])
            if got != expected:   # would mean the worker round-robin assumption broke: never silently continue
                raise RuntimeError(f"corpus {self.cfg.corpus}: received batch {got}, expected {expected}")
            self.cursor = self.stream.cursor_after(got.epoch, got.batches)  # counts batches of skipped samples
            self.damage.record(batch.pop("skipped", ()), int(batch.pop("requested", 0)))
            if not batch.get("empty"):
                return batch

    def worker_pids(self) -> list[int]:
        """Process ids of the running DataLoader workers (empty before the first batch or without workers):
        for measuring the loader's CPU cost over all its processes."""
        return [w.pid for w in getattr(self._it, "_workers", [])]

    def close(self) -> None:
        """Stop worker processes (also done on garbage collection)."""
        self._it = None
        self._loader = None

    # ------------------------------------------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self.stream.normalize(self.cursor).epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return self.stream.plan(self.epoch if epoch is None else epoch)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan().batches_per_rank

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {"corpus": c.corpus, "seed": c.seed, "batch_size": c.batch_size, "streams_per_rank": c.streams,
                "world_size": self.world_size, "rank": self.rank, "shards_in_flight": c.shards_in_flight,
                "shuffle_buffer": c.shuffle_buffer, "num_shards": len(self.index.shards),
                "num_samples": self.index.num_samples}

    def state_dict(self) -> dict[str, Any]:
        cur = self.stream.normalize(self.cursor)
        plan = self.stream.plan(cur.epoch)
        return {"version": STATE_VERSION, **cur.to_dict(),
                "samples_seen": cur.batches * self.cfg.batch_size, "batches_per_epoch": plan.batches_per_rank,
                "order": self._fingerprint(), "damage": self.damage.state_dict()}

    def load_state_dict(self, state: dict[str, Any], *, allow_reshard: bool = False) -> None:
        """Resume at ``state``'s cursor. Any difference in what determines the order is an error, unless
        ``allow_reshard`` (an elastic resize), which restarts at the next epoch boundary, loudly."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine, theirs = self._fingerprint(), state["order"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        cursor = Cursor.from_dict(state)
        if diff:
            if not allow_reshard or set(diff) - {"world_size", "rank"}:
                raise ValueError(f"corpus {self.cfg.corpus}: loader state does not match this loader "
                                 f"(saved, now): {diff}")
            cursor = Cursor(cursor.epoch + (1 if cursor.batches else 0), 0)
            log.warning("corpus %s: world size changed %s; exact resume impossible, restarting at epoch %d",
                        self.cfg.corpus, diff, cursor.epoch)
        self.cursor = self.stream.normalize(cursor)
        self.damage.load_state_dict(state.get("damage"))
        self.close()
        log.info("corpus %s rank %d: resuming at epoch %d batch %d", self.cfg.corpus, self.rank,
                 self.cursor.epoch, self.cursor.batches)


def build_loader(cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1, tokenize: Tokenize | None = None
                 ) -> CorpusLoader:
    """The loader of one corpus for one rank (see module docstring)."""
    return CorpusLoader(cfg, rank=rank, world_size=world_size, tokenize=tokenize)
