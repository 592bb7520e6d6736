"""Fine-tuning tasks for the training loop: build the task module, and evaluate it on a held-out corpus.

Supported: ``retrieval`` (text↔video/image, R@1/5/10 both directions, ITC top-k then ITM re-rank),
``caption`` (BLEU-4, ROUGE-L, CIDEr through pycocoevalcap), ``qa`` (answer generation, exact-match
accuracy; a QA corpus stores the question as the caption and the answer in each sample's json), ``classify``
(linear head on the video CLS, top-1 / top-5 accuracy; labels come from each sample's json, a class name
from ``classes`` or its index). Evaluation reads the whole eval corpus in
manifest order with the eval transform; every rank computes the same numbers (eval sets are small next to
training sets; only rank 0 logs them).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from mplug2.data.collate import decode_sample
from mplug2.data.dataset_index import load_index
from mplug2.data.stream import iter_shard_samples
from mplug2.data.text import pre_caption
from mplug2.data.transforms import TransformConfig, VideoTransform
from mplug2.models.mplug2 import MPLUG2
from mplug2.train.config import CorpusConfig, TrainConfig

if TYPE_CHECKING:
    from mplug2.train.loop import TrainLoop

log = logging.getLogger(__name__)

FINETUNE_TASKS = ("retrieval", "caption", "qa", "classify")


def build(cfg: TrainConfig, model: MPLUG2, tokenizer, world_size: int) -> nn.Module:
    if cfg.task == "retrieval":
        from mplug2.tasks.retrieval import RetrievalConfig, Retriever

        return Retriever(model, tokenizer, RetrievalConfig(
            global_batch=cfg.data.batch_size * world_size, itm_weight=cfg.loss_weights.get("itm", 1.0)))
    if cfg.task == "caption":
        from mplug2.tasks.caption import CaptionConfig, Captioner

        return Captioner(model, tokenizer, CaptionConfig())
    if cfg.task == "qa":
        return QATask(model, tokenizer, max_answer_len=model.config.max_answer_len)
    if cfg.task == "classify":
        return ClassifyTask(model, cfg.classes)
    raise NotImplementedError(f"fine-tuning task {cfg.task!r}: supported are {FINETUNE_TASKS}")


class QATask(nn.Module):
    """:class:`~mplug2.tasks.qa.VideoQA` over loader batches: questions are the tokenised captions, answers
    (``batch["answers"]``) are tokenised here as ``[CLS] answer [SEP]``."""

    def __init__(self, model: MPLUG2, tokenizer, max_answer_len: int = 10) -> None:
        super().__init__()
        from mplug2.tasks.qa import VideoQA

        self.qa = VideoQA(model, tokenizer)
        self.tok, self.max_answer_len = tokenizer, max_answer_len

    @property
    def model(self) -> MPLUG2:
        return self.qa.model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        answers = batch.get("answers")
        if answers is None or any(a is None for a in answers):
            raise ValueError("QA batches need an `answer` in every sample's json (see pipelines.synthetic)")
        enc = self.tok(list(answers), max_length=self.max_answer_len + 2)
        dev = batch["input_ids"].device
        return self.qa({**batch, "answer_ids": enc["input_ids"].to(dev), "answer_mask": enc["attention_mask"].to(dev)})

    def predict(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        return self.qa.predict(pixels, input_ids, attention_mask)


class ClassifyTask(nn.Module):
    """:class:`~mplug2.tasks.classify.VisualClassifier` over loader batches: maps each sample's raw label
    (``batch["class_labels"]``: a name from ``classes`` or an index) to its class id."""

    def __init__(self, model: MPLUG2, classes: list[str]) -> None:
        super().__init__()
        from mplug2.tasks.classify import VisualClassifier

        self.classes = list(classes)
        self.index = {name: i for i, name in enumerate(self.classes)}
        self.clf = VisualClassifier(model, len(self.classes))

    @property
    def model(self) -> MPLUG2:
        return self.clf.model

    def label_ids(self, labels: list[Any]) -> torch.Tensor:
        ids = []
        for lb in labels:
            if isinstance(lb, int) and not isinstance(lb, bool) and 0 <= lb < len(self.classes):
                ids.append(lb)
            elif isinstance(lb, str) and lb in self.index:
                ids.append(self.index[lb])
            elif isinstance(lb, str) and lb.isdigit() and int(lb) < len(self.classes):
                ids.append(int(lb))
            else:
                raise ValueError(f"label {lb!r} is neither one of the {len(self.classes)} configured classes "
                                 f"({', '.join(self.classes[:8])}{', ...' if len(self.classes) > 8 else ''}) "
                                 "nor a class index")
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch.get("class_labels")
        if labels is None or any(lb is None for lb in labels):
            raise ValueError("classification batches need a label in every sample's json (see `label_key`)")
        out = self.clf({"pixels": batch["pixels"], "labels": self.label_ids(labels).to(batch["pixels"].device)})
        return {"loss": out["loss"], "acc": out["acc"]}

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clf({"pixels": pixels})["logits"]


@dataclass
class EvalSet:
    """A whole held-out corpus, decoded with the eval transform."""

    keys: list[str]
    pixels: torch.Tensor            # (N, 3, T, H, W)
    captions: list[list[str]]       # every reference per item, cleaned (the question, for QA)
    answers: list[str | None]
    labels: list[str | int | None] | None = None


def load_eval_set(corpus: CorpusConfig, res: int, max_items: int | None = None, label_key: str = "label") -> EvalSet:
    index = load_index(corpus.path, corpus.split)
    transform = VideoTransform(TransformConfig(res=res, train=False))
    keys, pixels, caps, answers, labels = [], [], [], [], []
    for raw in _samples(index):
        dec = decode_sample(raw, num_frames=corpus.num_frames, train=False, rng=random.Random(0), label_key=label_key)
        keys.append(dec.key)
        pixels.append(transform(dec.frames, random.Random(0)))
        caps.append([pre_caption(c) for c in dec.captions])
        answers.append(dec.answer)
        labels.append(dec.label)
        if max_items and len(keys) >= max_items:
            break
    if not keys:
        raise ValueError(f"eval corpus {corpus.path} has no samples")
    return EvalSet(keys, torch.stack(pixels), caps, answers, labels)


def _samples(index) -> Iterator[dict[str, Any]]:
    for shard in index.shards:
        yield from iter_shard_samples(shard)


def evaluate_task(task: nn.Module, kind: str, data: EvalSet, tokenizer, *, max_text_len: int = 30,
                  device: torch.device | None = None, batch_size: int = 32) -> dict[str, float]:
    """Scores of ``task`` (a ``retrieval`` or ``caption`` module) on ``data``."""
    device = device or next(task.parameters()).device
    pixels = data.pixels.to(device)
    if kind == "retrieval":
        from mplug2.tasks.retrieval import evaluate_retrieval

        texts, text_to_item = [], []
        for i, caps in enumerate(data.captions):
            for c in caps:
                texts.append(c)
                text_to_item.append(i)
        tok = tokenizer(texts, max_length=max_text_len)
        scores = evaluate_retrieval(task, pixels, tok["input_ids"].to(device), tok["attention_mask"].to(device),
                                    text_to_item, k=min(16, len(data.keys)))
        return {k: float(v) for k, v in scores.items()}
    if kind == "caption":
        from mplug2.eval.caption_metrics import coco_caption_scores

        cands = {}
        for i in range(0, len(data.keys), batch_size):
            for key, text in zip(data.keys[i:i + batch_size], task.predict(pixels[i:i + batch_size])):
                cands[key] = text
        refs = {k: caps for k, caps in zip(data.keys, data.captions)}
        scores = coco_caption_scores(refs, cands)
        log.info("caption samples: %s", "; ".join(f"{k}: {cands[k]!r} (ref {refs[k][0]!r})"
                                                  for k in data.keys[:3]))
        return {k: float(v) for k, v in scores.items()}
    if kind == "qa":
        from mplug2.eval.qa_metrics import exact_match_accuracy

        preds: list[str] = []
        for i in range(0, len(data.keys), batch_size):
            tok = tokenizer([c[0] for c in data.captions[i:i + batch_size]], max_length=max_text_len)
            preds += task.predict(pixels[i:i + batch_size], tok["input_ids"].to(device),
                                  tok["attention_mask"].to(device))
        log.info("qa samples: %s", "; ".join(f"{c[0]!r} -> {p!r} (gold {a!r})"
                                             for c, p, a in list(zip(data.captions, preds, data.answers))[:3]))
        return {"accuracy": float(exact_match_accuracy(preds, data.answers))}
    if kind == "classify":
        if not data.labels or any(lb is None for lb in data.labels):
            raise ValueError("the classification eval corpus needs a label in every sample's json")
        gold = task.label_ids(list(data.labels)).to(device)
        logits = torch.cat([task.logits(pixels[i:i + batch_size]) for i in range(0, len(data.keys), batch_size)])
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        return {"top1": 100.0 * float((topk[:, 0] == gold).float().mean()),
                f"top{k}": 100.0 * float((topk == gold[:, None]).any(dim=1).float().mean())}
    raise NotImplementedError(kind)


_CACHE: dict[tuple, EvalSet] = {}


def evaluate(loop: "TrainLoop") -> dict[str, float]:
    """The loop's evaluation hook: the configured eval corpus, cached per process."""
    cfg = loop.cfg
    corpus = cfg.data.eval
    key = (corpus.path, corpus.num_frames, loop.mcfg.vision.image_res, cfg.label_key)
    if key not in _CACHE:
        _CACHE[key] = load_eval_set(corpus, loop.mcfg.vision.image_res, label_key=cfg.label_key)
    return evaluate_task(loop.task, cfg.task, _CACHE[key], loop.tokenizer, max_text_len=cfg.data.max_text_len,
                         device=loop.device)
