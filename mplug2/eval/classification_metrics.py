"""Classification scores as GLUE reports them: accuracy for every task; for binary tasks also F1 of the
positive class (class 1, as MRPC / QQP) and the Matthews correlation (as CoLA)."""

from __future__ import annotations

import math

import torch

__all__ = ["classification_scores"]


def classification_scores(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy`` (%), and with two classes ``f1`` (%, positive class 1) and ``matthews`` (in [-1, 1])."""
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"predictions {tuple(pred.shape)} and gold labels {tuple(gold.shape)}: two equal 1-d tensors")
    if pred.numel() == 0:
        raise ValueError("no examples to score")
    out = {"accuracy": 100.0 * float((pred == gold).float().mean())}
    if num_classes == 2:
        tp = int(((pred == 1) & (gold == 1)).sum())
        tn = int(((pred == 0) & (gold == 0)).sum())
        fp = int(((pred == 1) & (gold == 0)).sum())
        fn = int(((pred == 0) & (gold == 1)).sum())
        out["f1"] = 100.0 * (2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["matthews"] = (tp * tn - fp * fn) / denom if denom else 0.0    # sklearn's convention: 0 if undefined
    return out
