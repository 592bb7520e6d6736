"""Batch inference over a committed shard corpus, one input shard -> one output parquet (no Ray here).

The unit of work and of commit is the shard: :func:`infer_shard` streams one tar (checking its sample count
and sha256 against ``dataset.json``), decodes each sample's frames with the eval transform, runs the model in
batches and writes ``<output>/<split>-NNNNNN.parquet`` in one atomic step (local: temp file + ``os.replace``;
S3: one PUT). So an output parquet exists iff its shard is finished, a killed run resumes by skipping the
shards whose parquet exists, and a half-written output is never visible. ``_infer.json``, written before any
shard, records what the folder holds (task, model, corpus) so a re-run with other settings cannot mix outputs.

Embed outputs are embedding files (:mod:`mplug2.inference.index`): one media row per sample (``id`` = the sample
key) plus, by default, one ``text`` row with its caption's embedding, so ``mplug2-model retrieve --index <output>``
searches the folder as it grows. ``source`` is null (a sample lives inside its ``shard``, not at a URL of its own).

The Ray Data orchestration (actor pool, resources, progress) lives in ``jobs/infer.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import random
import re
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Iterator, Protocol, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mplug2 import storage
from mplug2.data.collate import SampleError, decode_sample
from mplug2.data.dataset_index import DatasetIndex, ShardInfo, load_index
from mplug2.data.stream import iter_tar_samples
from mplug2.inference.index import SCHEMA as EMBEDDING_SCHEMA
from mplug2.side_threads import single_threaded_torch

log = logging.getLogger(__name__)

__all__ = [
    "TASKS", "InferOptions", "ShardResult", "InferPlan", "InferSummary", "InferConfigError", "OutputMismatchError",
    "DamagedShardError", "plan_run", "output_schema",
    "infer_shard", "output_url", "resolve_device", "MARKER",
]

TASKS = ("embed", "caption", "qa")
MARKER = "_infer.json"
FORMAT = "mplug2-infer/1"
_FRAME_RE = re.compile(r"^f\d{3}\.(jpg|jpeg|png|webp)$")


class InferConfigError(ValueError):
    """Arguments that cannot work (bad option values, no model folder, output = input)."""


class OutputMismatchError(InferConfigError):
    """The output folder already holds results of another task, model or corpus."""


class DamagedShardError(ValueError):
    """An input shard is unreadable or differs from what ``dataset.json`` recorded (count, sha256)."""


class PredictorLike(Protocol):
    """What this module needs of ``mplug2.inference.predictor.Predictor``."""

    num_frames: int
    device: torch.device

    def pixels_from_frames(self, frames: Sequence[Any]) -> torch.Tensor: ...
    def embed_media(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...
    def caption(self, pixels: torch.Tensor, **kwargs: Any) -> list[str]: ...
    def answer(self, pixels: torch.Tensor, questions: Sequence[str], **kwargs: Any) -> list[str]: ...


@dataclass(frozen=True)
class InferOptions:
    """What to compute per sample. ``question``: qa asks it of every sample; None = each sample's caption is
    its question (QA corpora store the question as the caption and the answer in ``json.answer``)."""

    task: str
    batch_size: int = 16
    embed_texts: bool = True
    beam_size: int = 3
    max_len: int | None = None
    question: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InferConfigError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.batch_size < 1 or self.beam_size < 1:
            raise InferConfigError(f"batch size and beam size must be >= 1, got {self.batch_size}, {self.beam_size}")


@dataclass
class ShardResult:
    """The outcome of one shard: ``done`` (parquet committed), ``damaged`` (input unreadable, skipped) or
    ``failed`` (storage or model error; the shard is redone by the next run)."""

    shard: str
    status: str
    samples: int = 0
    rows: int = 0
    seconds: float = 0.0
    error: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InferPlan:
    index: DatasetIndex
    output: str
    pending: list[ShardInfo]
    finished: list[ShardInfo]


@dataclass
class InferSummary:
    """End-of-run accounting, printed as a table; ``exit_code`` is 1 when a shard failed or was damaged."""

    task: str
    skipped: int = 0
    results: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.results if r.status == "done")

    @property
    def exit_code(self) -> int:
        return 0 if self.count("damaged") == 0 and self.count("failed") == 0 else 1

    def table(self) -> str:
        per_s = (lambda n: n / self.seconds if self.seconds > 0 else 0.0)
        lines = [
            f"mplug2-infer {self.task}",
            f"  shards done        {self.count('done')}",
            f"  shards skipped     {self.skipped}   (finished by an earlier run)",
            f"  shards damaged     {self.count('damaged')}",
            f"  shards failed      {self.count('failed')}   (re-run to retry)",
            f"  samples            {self.samples}",
            f"  rows written       {self.rows}",
            f"  wall time          {self.seconds:.1f} s   ({per_s(self.samples):.1f} samples/s, "
            f"{per_s(self.rows):.1f} rows/s)",
        ]
        busy = sum(r.seconds for r in self.results if r.status == "done")
        if busy > 0:
            lines.append(f"  in shard tasks     {busy:.1f} s   ({self.samples / busy:.1f} samples/s per actor)")
        for r in self.results:
            if r.status != "done":
                lines.append(f"  {r.status:8s} {r.shard}: {r.error}")
        return "\n".join(lines)


def resolve_device(device: str) -> tuple[str, torch.dtype | None]:
    """``auto``: CUDA with bf16 when this process sees a CUDA device, else CPU in fp32. A Ray actor can hold a
    GPU *resource* without a CUDA device (a fake or misconfigured node): it then runs on CPU, logged."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device; use --device auto or cpu")
    return device, (torch.bfloat16 if device.startswith("cuda") else None)


def output_url(output: str, shard: ShardInfo) -> str:
    return storage.join(output, shard.name[: -len(".tar")] + ".parquet")


def _canonical(url: str) -> str:
    """One spelling per location, so a re-run from another folder or with a trailing slash matches."""
    url = str(url).rstrip("/")
    return url if storage.is_remote(url) else os.path.abspath(url)


def _marker(task: str, model: str, shards: str, split: str, options: InferOptions) -> dict[str, Any]:
    return {"format": FORMAT, "task": task, "model": _canonical(model), "shards": _canonical(shards),
            "split": split, "options": asdict(options)}


def plan_run(shards: str, output: str, *, model: str, options: InferOptions, split: str = "train",
             overwrite: bool = False) -> InferPlan:
    """Read the corpus index, check or write the output marker, and split shards into pending / finished."""
    if _canonical(shards) == _canonical(output):
        raise InferConfigError("--output must differ from --shards: the corpus's own per-shard parquet "
                               "sidecars use the same names")
    index = load_index(shards, split)
    marker_url = storage.join(output, MARKER)
    wanted = _marker(options.task, model, shards, split, options)
    if overwrite:
        for shard in index.shards:
            storage.remove(output_url(output, shard))
    elif storage.exists(marker_url):
        found = json.loads(storage.read_bytes(marker_url))
        differs = [k for k in ("format", "task", "model", "shards", "split", "options") if found.get(k) != wanted[k]]
        if differs:
            raise OutputMismatchError(
                f"{output} holds {found.get('task')} outputs of model {found.get('model')} over "
                f"{found.get('shards')} ({', '.join(differs)} differ from this run); choose another --output "
                "or pass --overwrite")
    storage.atomic_write(marker_url, json.dumps(wanted, indent=1, sort_keys=True).encode())
    pending, finished = [], []
    for shard in index.shards:
        (finished if storage.exists(output_url(output, shard)) else pending).append(shard)
    return InferPlan(index=index, output=output, pending=pending, finished=finished)


# ----------------------------------------------------------------------------------------------- reading

class _HashingReader(io.RawIOBase):
    """Counts and hashes the bytes ``tarfile`` pulls through it, so the stream is checked in one pass."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n


def _read_samples(shard: ShardInfo) -> Iterator[dict[str, bytes]]:
    """Raw samples of one shard; at the end the count, size and sha256 must match the manifest."""
    def _open() -> IO[bytes]:
        fs, path = storage.get_fs(shard.url)
        return fs.open(path, "rb", block_size=8 << 20) if storage.is_remote(shard.url) else open(path, "rb")

    try:
        f = storage.retry_io(_open, what=f"open {shard.url}")
    except FileNotFoundError as exc:
        raise DamagedShardError("listed in dataset.json but missing") from exc
    with f:
        reader = _HashingReader(f)
        n = 0
        try:
            for sample in iter_tar_samples(io.BufferedReader(reader, 1 << 20), shard.url):
                n += 1
                if n > shard.nsamples:
                    raise DamagedShardError(f"more samples than the {shard.nsamples} dataset.json records")
                yield sample
            # tarfile stops at the end-of-archive blocks; the padding after them belongs to the bytes hashed.
            while reader.read(1 << 20):
                pass
        except (tarfile.TarError, EOFError, ValueError) as exc:
            if isinstance(exc, DamagedShardError):
                raise
            raise DamagedShardError(f"not a readable tar ({type(exc).__name__}: {exc})") from exc
    if n != shard.nsamples:
        raise DamagedShardError(f"{n} samples, dataset.json records {shard.nsamples} (truncated?)")
    if shard.bytes is not None and reader.nbytes != shard.bytes:
        raise DamagedShardError(f"{reader.nbytes} bytes, dataset.json records {shard.bytes}")
    if shard.sha256 and reader.sha.hexdigest() != shard.sha256:
        raise DamagedShardError("sha256 differs from dataset.json (corrupted)")


@dataclass
class _Item:
    key: str
    modality: str
    caption: str
    answer: str | None
    pixels: torch.Tensor


def _decoded_batches(predictor: PredictorLike, shard: ShardInfo, batch_size: int) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    for raw in _read_samples(shard):
        modality = "video" if any(_FRAME_RE.match(k) for k in raw) else "image"
        try:
            sample = decode_sample(raw, num_frames=predictor.num_frames, train=False, rng=random.Random(0))
        except SampleError as exc:
            raise DamagedShardError(str(exc)) from exc
        batch.append(_Item(sample.key, modality, sample.captions[0], sample.answer,
                           predictor.pixels_from_frames(sample.frames)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(it: Iterator[Any], depth: int = 2, *, cores_busy: bool = False) -> Iterator[Any]:
    """Run ``it`` in a thread ``depth`` items ahead: JPEG decoding overlaps the model (both release the GIL).
    An error in ``it`` is raised here; when the consumer stops early the thread stops at its next hand-over.
    ``cores_busy`` (a model on the CPU, whose OpenMP team uses the cores): the thread's torch ops get no team of
    their own (:mod:`mplug2.side_threads`); beside a GPU model they keep theirs."""
    q: queue.Queue = queue.Queue(depth)
    end, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        if cores_busy:
            single_threaded_torch()
        try:
            for item in it:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    threading.Thread(target=work, daemon=True, name="infer-decode").start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ------------------------------------------------------------------------------------------------ model

def _rows_for(predictor: PredictorLike, batch: list[_Item], options: InferOptions, shard: str) -> dict[str, list]:
    pixels = torch.stack([it.pixels for it in batch])
    base = {"id": [it.key for it in batch], "modality": [it.modality for it in batch], "shard": [shard] * len(batch)}
    with torch.inference_mode():
        if options.task == "embed":
            captions = [it.caption for it in batch]
            rows = {**base, "embedding": list(predictor.embed_media(pixels).float().cpu().numpy()),
                    "caption": captions}
            if options.embed_texts:   # the caption as a text row of the same id: text->text search, video->text
                text = {**base, "modality": ["text"] * len(batch), "caption": captions,
                        "embedding": list(predictor.embed_texts(captions).float().cpu().numpy())}
                rows = {k: rows[k] + text[k] for k in rows}
            return rows
        if options.task == "caption":
            kwargs: dict[str, Any] = {"beam_size": options.beam_size}
            if options.max_len is not None:
                kwargs["max_len"] = options.max_len
            return {**base, "caption": predictor.caption(pixels, **kwargs),
                    "reference": [it.caption for it in batch]}
        questions = [options.question or it.caption for it in batch]
        return {**base, "question": questions, "answer": predictor.answer(pixels, questions),
                "reference_answer": [it.answer for it in batch]}


def output_schema(task: str) -> pa.Schema:
    """Columns of one output parquet: embed = the embedding-file schema plus ``caption`` and ``shard``."""
    if task == "embed":
        return EMBEDDING_SCHEMA.append(pa.field("caption", pa.string())).append(pa.field("shard", pa.string()))
    common = [("id", pa.string()), ("modality", pa.string()), ("shard", pa.string())]
    extra = {"caption": [("caption", pa.string()), ("reference", pa.string())],
             "qa": [("question", pa.string()), ("answer", pa.string()), ("reference_answer", pa.string())]}[task]
    return pa.schema([pa.field(n, t) for n, t in common + extra])


def infer_shard(predictor: PredictorLike, shard: ShardInfo, output: str, options: InferOptions,
                metadata: dict[str, Any] | None = None) -> ShardResult:
    """Run ``options.task`` over one shard and commit its parquet; never raises for a bad shard or an I/O
    error (the result says ``damaged`` / ``failed``), so one shard cannot take the whole run down."""
    t0 = time.monotonic()
    columns: dict[str, list] = {}
    samples = 0
    try:
        for batch in _prefetch(_decoded_batches(predictor, shard, options.batch_size),
                               cores_busy=predictor.device.type == "cpu"):
            for k, v in _rows_for(predictor, batch, options, shard.url).items():
                columns.setdefault(k, []).extend(v)
            samples += len(batch)
        schema = output_schema(options.task)
        meta = {b"mplug2.infer": json.dumps({**(metadata or {}), "shard": shard.name, "samples": samples}).encode()}
        n = len(columns.get("id", []))
        table = pa.Table.from_pydict({f.name: columns.get(f.name, [None] * n) for f in schema}, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        storage.atomic_write(output_url(output, shard), buf.getvalue())
    except DamagedShardError as exc:
        log.warning("shard %s is damaged, skipped: %s", shard.url, exc)
        return ShardResult(shard.name, "damaged", samples, 0, time.monotonic() - t0, str(exc))
    except (OSError, RuntimeError) as exc:
        log.error("shard %s failed: %s: %s", shard.url, type(exc).__name__, exc)
        return ShardResult(shard.name, "failed", samples, 0, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
    return ShardResult(shard.name, "done", samples, table.num_rows, time.monotonic() - t0)
