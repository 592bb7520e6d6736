"""A fine-tuned task's export applied to one's own media and texts: classification (of videos / images, or of
sentences and sentence pairs) and visual grounding.

The export (``<run>/best`` or ``final``) is rebuilt through the same task registry and loader as
``mplug2-train evaluate`` (:func:`mplug2.train.build.load_exported_task`), so the head, the class names and the
grounding head kind are the ones the run trained. Media go through :class:`~mplug2.inference.predictor.Predictor`'s
evaluation transform; texts through evaluation's tokenisation (GLUE pairs: :func:`mplug2.data.glue.tokenize`;
referring expressions: cleaned as captions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mplug2.inference.predictor import Predictor, _default_dtype

__all__ = ["TaskPredictor", "TASKS"]

# inference task -> the registry task whose export it reads
TASKS = {"classify": "classify", "classify-text": "text_classify", "ground": "grounding"}


class TaskPredictor:
    """One exported task model; build it with :meth:`load`."""

    def __init__(self, exported, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 num_frames: int | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(self.device)
        self.task = exported.module.to(self.device, self.dtype).eval()
        self.tok = exported.tokenizer
        self.config = exported.config
        # the media side (transform, pixel layout, frame count) of the same model
        self.media = Predictor(self.task.model, self.tok, device=self.device, dtype=self.dtype,
                               num_frames=num_frames)

    @classmethod
    def load(cls, model_dir: str, task: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
             num_frames: int | None = None) -> "TaskPredictor":
        """``task``: a registry task with a trained head (``classify``, ``text_classify``, ``grounding``).
        ``ValueError`` when the folder is not that task's export (no class list, no trained head)."""
        from mplug2.train.build import load_exported_task

        exported = load_exported_task(model_dir, task)
        if exported.report["new"]:
            raise ValueError(f"the model folder has no trained `{task}` head ({exported.report['new']} task weights "
                             f"missing): pass a `{task}` run's best/ or final/ export")
        return cls(exported, device=device, dtype=dtype, num_frames=num_frames)

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)

    @property
    def num_frames(self) -> int:
        return self.media.num_frames

    @torch.inference_mode()
    def classify(self, pixels: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, C)`` class probabilities (float32, CPU), in :attr:`classes` order."""
        return self.task.logits(self.media._pixels(pixels)).float().softmax(-1).cpu()

    @torch.inference_mode()
    def classify_texts(self, text_a: Sequence[str], text_b: Sequence[str] | None = None,
                       max_len: int = 128) -> Tensor:
        """Sentences (or pairs) -> ``(B, C)`` class probabilities, tokenised as the run's tsv was."""
        from mplug2.data.glue import tokenize

        if text_b is not None and len(text_b) != len(text_a):
            raise ValueError(f"{len(text_a)} first sentences but {len(text_b)} second ones")
        enc = tokenize(self.tok, list(text_a), None if text_b is None else list(text_b), max_len)
        logits = self.task.logits(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return logits.float().softmax(-1).cpu()

    @torch.inference_mode()
    def ground(self, pixels: Tensor, expressions: Sequence[str]) -> Tensor:
        """``(B, T, 3, H, W)`` and one referring expression per item -> ``(B, 4)`` normalised (x1, y1, x2, y2)
        boxes of the model's input (CPU)."""
        if len(expressions) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} items but {len(expressions)} expressions")
        ids, mask = self.media._texts(expressions)
        return self.task.predict(self.media._pixels(pixels), ids, mask).float().clamp(0, 1).cpu()
