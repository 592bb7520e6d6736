"""GLUE-style text classification corpora: one tab-separated file per split, read whole (no shards: a GLUE
train file is at most a few hundred MB of text, and has no media to decode).

The file has a header row. The text is one column (SST-2, CoLA with a header: ``sentence``) or a pair
(RTE / MNLI: ``sentence1``/``sentence2``; QNLI: ``question``/``sentence``; QQP: ``question1``/``question2``;
SNLI-style ``premise``/``hypothesis``), found by those header names unless the run names its columns. The
label is an int or a string (``label``, MNLI's ``gold_label``, QQP's ``is_duplicate``); the label set comes
from the train file (or the run's ``classes``). Fields are split on tabs only, with no quoting, as GLUE writes
them. GLUE's test files carry no labels and are refused; so is any line whose column count differs from the
header's, an empty file, and an eval label the train file never had: one line naming the file and line.

:class:`TextPairLoader` batches the examples for one data-parallel rank with a seeded per-epoch order and a
resumable cursor, the interface the training loop expects from the shard loaders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from mplug2 import storage
from mplug2.data.stream import derive_seed

log = logging.getLogger(__name__)

__all__ = ["TextExamples", "GlueFormatError", "read_glue_tsv", "label_set", "TextPairLoader", "TEXT_COLUMNS",
           "LABEL_COLUMNS"]

# Header names of the text column(s), most specific first: pairs before single sentences.
TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"), ("premise", "hypothesis"),
    ("sentence",),
)
LABEL_COLUMNS: tuple[str, ...] = ("label", "gold_label", "is_duplicate")


class GlueFormatError(ValueError):
    """A tsv that cannot be read as a labelled GLUE-style split (the message names the file and line)."""


@dataclass
class TextExamples:
    """One split: texts (a single sentence or a pair each) and their raw labels, in file order."""

    path: str
    text_a: list[str]
    text_b: list[str] | None        # None: single-sentence task
    labels: list[str]
    lines: list[int]                # 1-based line of each example in the file (for error messages)
    positions: list[int] | None = None   # example positions in the whole file (a rank's slice)
    total: int | None = None

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = list(range(len(self.text_a)))
        if self.total is None:
            self.total = len(self.text_a)

    def __len__(self) -> int:
        return len(self.text_a)

    def shard(self, rank: int, world_size: int) -> "TextExamples":
        """Examples ``rank, rank + world_size, ...`` (data-parallel evaluation)."""
        take = [i for i, p in enumerate(self.positions) if p % world_size == rank]
        return TextExamples(self.path, [self.text_a[i] for i in take],
                            None if self.text_b is None else [self.text_b[i] for i in take],
                            [self.labels[i] for i in take], [self.lines[i] for i in take],
                            [self.positions[i] for i in take], self.total)


def _columns(path: str, header: list[str], text_columns: Sequence[str], label_column: str) -> tuple[list[int], int]:
    def index(name: str) -> int:
        if name not in header:
            raise GlueFormatError(f"{path}:1: no column {name!r} in the header ({', '.join(header)})")
        return header.index(name)

    if text_columns:
        if len(text_columns) not in (1, 2):
            raise GlueFormatError(f"text_columns names {len(text_columns)} columns; a task reads one or two")
        texts = [index(c) for c in text_columns]
    else:
        found = next((names for names in TEXT_COLUMNS if all(n in header for n in names)), None)
        if found is None:
            raise GlueFormatError(
                f"{path}:1: no text column in the header ({', '.join(header)}); expected one of "
                f"{', '.join('/'.join(n) for n in TEXT_COLUMNS)}, or set task_options.text_columns")
        texts = [header.index(n) for n in found]
    if label_column:
        return texts, index(label_column)
    label = next((header.index(n) for n in LABEL_COLUMNS if n in header), None)
    if label is None:
        raise GlueFormatError(
            f"{path}:1: no label column ({'/'.join(LABEL_COLUMNS)}) in the header ({', '.join(header)}); GLUE "
            "test files carry no labels: train and evaluate on train/dev files, or set task_options.label_column")
    return texts, label


def read_glue_tsv(path: str, *, text_columns: Sequence[str] = (), label_column: str = "") -> TextExamples:
    """Every labelled example of the tsv at ``path`` (local or ``s3://``); :class:`GlueFormatError` otherwise."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise GlueFormatError(f"{path}: no such file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GlueFormatError(f"{path}:{line}: not UTF-8 text ({e.reason}); GLUE tsv files are UTF-8") from None
    rows = text.splitlines()
    if not rows or not rows[0].strip():
        raise GlueFormatError(f"{path}: empty file; expected a header row, then one example per line")
    header = [h.strip() for h in rows[0].split("\t")]
    texts, label = _columns(path, header, text_columns, label_column)
    a, b, labels, lines = [], [] if len(texts) == 2 else None, [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row.strip():
            continue
        fields = row.split("\t")
        if len(fields) != len(header):
            raise GlueFormatError(f"{path}:{n}: {len(fields)} tab-separated fields, the header has {len(header)} "
                                  "(a tab inside a sentence, or a truncated line)")
        value = fields[label].strip()
        if not value or value == "-":          # MNLI/SNLI mark pairs without a gold label with '-'
            raise GlueFormatError(f"{path}:{n}: empty label in column {header[label]!r}")
        a.append(fields[texts[0]].strip())
        if b is not None:
            b.append(fields[texts[1]].strip())
        labels.append(value)
        lines.append(n)
    if not a:
        raise GlueFormatError(f"{path}: a header and no examples")
    return TextExamples(path, a, b, labels, lines)


def label_set(examples: TextExamples) -> list[str]:
    """The class names of a train split, in head order: numerically when every label is an int (GLUE's 0/1),
    else alphabetically (independent of file order)."""
    names = set(examples.labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def label_ids(examples: TextExamples, classes: Sequence[str]) -> torch.Tensor:
    """Class index of each example; an unknown label is a :class:`GlueFormatError` naming its line."""
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for value, line in zip(examples.labels, examples.lines):
        if value not in index:
            raise GlueFormatError(f"{examples.path}:{line}: label {value!r} is not one of the {len(classes)} "
                                  f"classes of the train file ({', '.join(classes[:8])}"
                                  f"{', ...' if len(classes) > 8 else ''})")
        out.append(index[value])
    return torch.tensor(out, dtype=torch.long)


def tokenize(tokenizer: Any, text_a: Sequence[str], text_b: Sequence[str] | None, max_length: int) -> dict[str, torch.Tensor]:
    """``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, truncated longest-first to ``max_length``."""
    if text_b is None:
        return tokenizer(list(text_a), max_length=max_length)
    enc = tokenizer.hf(list(text_a), list(text_b), max_length=max_length, padding="longest", truncation=True,
                       return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class TextPairLoader:
    """Endless tokenised batches of one rank's share of a text split.

    Each epoch is a permutation seeded by ``(seed, epoch)``; rank ``r`` of ``w`` takes every ``w``-th example
    of it, so ranks see disjoint examples; every rank yields ``len // (batch_size * w)`` batches per epoch (the
    same number of steps on every rank). ``state_dict`` is the epoch and the cursor: a resumed run continues
    with the next batch it would have drawn.
    """

    def __init__(self, examples: TextExamples, classes: Sequence[str], tokenizer: Any, *, batch_size: int,
                 max_length: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.examples, self.tokenizer = examples, tokenizer
        self.labels = label_ids(examples, classes)
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(examples) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise GlueFormatError(f"{examples.path}: {len(examples)} examples, fewer than one global batch "
                                  f"({batch_size} x {world_size} ranks); lower data.batch_size")
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "text-pairs", self.epoch))
        perm = torch.randperm(len(self.examples), generator=g).tolist()
        return perm[self.rank::self.world_size][: self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.cursor >= self.steps_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.cursor * self.batch_size:(self.cursor + 1) * self.batch_size]
        self.cursor += 1
        ex = self.examples
        batch = tokenize(self.tokenizer, [ex.text_a[i] for i in idx],
                         None if ex.text_b is None else [ex.text_b[i] for i in idx], self.max_length)
        batch.update(labels=self.labels[idx], keys=[f"{ex.path}:{ex.lines[i]}" for i in idx], epoch=self.epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "examples": len(self.examples),
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("examples"), state.get("world_size")) != (len(self.examples), self.world_size):
            raise ValueError(f"the checkpoint's data cursor is for {state.get('examples')} examples on "
                             f"{state.get('world_size')} ranks, this run has {len(self.examples)} on "
                             f"{self.world_size}: the train file or the number of workers changed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()

    def close(self) -> None:
        """Nothing to release (the split is in memory); the loop closes every loader."""
