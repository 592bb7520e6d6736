"""Classification heads (model-spec §5, *inferred*): images/videos from the dual-vision encoder's CLS,
text (GLUE-style) from the text encoder's [CLS] — the ``BertForSequenceClassification`` recipe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.models.mplug2 import MPLUG2

__all__ = ["VisualClassifier", "TextClassifier", "ClassifyTask", "TextClassifyTask"]


def _outputs(logits: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = F.cross_entropy(logits.float(), labels)
        out["acc"] = (logits.argmax(-1) == labels).float().mean().detach()
    return out


class VisualClassifier(nn.Module):
    """Linear head on the video CLS (mean over frames of the per-frame CLS, after ``ln_post``).

    Only the dual-vision encoder runs (no universal layers): the CLIP recipe for K400-style fine-tuning.
    Batch: ``{"pixels", "labels"?}``.
    """

    def __init__(self, model: MPLUG2, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(model.config.vision.width, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cls = self.model.vision(batch["pixels"])[:, 0]
        return _outputs(self.head(self.dropout(cls)), batch.get("labels"))

    @torch.no_grad()
    def predict(self, pixels: Tensor) -> Tensor:
        """Class index per sample."""
        return self.forward({"pixels": pixels})["logits"].argmax(-1)


class TextClassifier(nn.Module):
    """Dropout + linear head on the text encoder's [CLS]. Batch: ``{"input_ids", "attention_mask", "labels"?}``."""

    def __init__(self, model: MPLUG2, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(model.config.text.hidden, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cls = self.model.encode_text(batch["input_ids"], batch["attention_mask"])[:, 0]
        return _outputs(self.head(self.dropout(cls)), batch.get("labels"))

    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.forward({"input_ids": input_ids, "attention_mask": attention_mask})["logits"].argmax(-1)


class ClassifyTask(nn.Module):
    """:class:`~mplug2.tasks.classify.VisualClassifier` over loader batches: maps each sample's raw label
    (``batch["class_labels"]``: a name from ``classes`` or an index) to its class id."""

    def __init__(self, model: MPLUG2, classes: list[str]) -> None:
        super().__init__()
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


class TextClassifyTask(nn.Module):
    """:class:`~mplug2.tasks.classify.TextClassifier` over :class:`~mplug2.data.glue.TextPairLoader` batches
    (``input_ids``, ``attention_mask``, ``labels`` as class ids in the order of ``classes``)."""

    def __init__(self, model: MPLUG2, classes: list[str]) -> None:
        super().__init__()
        self.classes = list(classes)
        self.clf = TextClassifier(model, len(self.classes))

    @property
    def model(self) -> MPLUG2:
        return self.clf.model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.clf({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        return {"loss": out["loss"], "acc": out["acc"]}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clf({"input_ids": input_ids, "attention_mask": attention_mask})["logits"]
