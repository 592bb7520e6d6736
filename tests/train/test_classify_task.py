"""The ``classify`` fine-tuning task: label mapping from sample json, clear errors, top-k evaluation."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.train.config import TrainConfig
from mplug2.tasks.classify import ClassifyTask
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks import EvalContext, get_task

CLASSES = ["left", "right", "up", "down"]


@pytest.fixture(scope="module")
def task() -> ClassifyTask:
    torch.manual_seed(0)
    return ClassifyTask(MPLUG2(MPLUG2Config.preset("tiny")), CLASSES)


def test_labels_are_names_or_indices(task):
    assert task.label_ids(["up", 1, "3", "left"]).tolist() == [2, 1, 3, 0]
    for bad in (["sideways"], [4], [-1], ["7"], [True], [None]):
        with pytest.raises(ValueError, match="configured classes"):
            task.label_ids(bad)


def test_training_step_needs_a_label_on_every_sample(task):
    pixels = torch.randn(2, 3, 4, 32, 32)
    out = task({"pixels": pixels, "class_labels": ["up", "down"]})
    assert out["loss"].requires_grad and 0.0 <= float(out["acc"]) <= 1.0
    with pytest.raises(ValueError, match="label in every sample"):
        task({"pixels": pixels, "class_labels": ["up", None]})
    with pytest.raises(ValueError, match="label in every sample"):
        task({"pixels": pixels})


def test_evaluation_reports_top1_and_top_k(task):
    torch.manual_seed(1)
    pixels = torch.randn(6, 3, 4, 32, 32)
    with torch.no_grad():
        pred = task.logits(pixels).argmax(1).tolist()
    gold = [CLASSES[p] for p in pred[:3]] + [CLASSES[(p + 1) % 4] for p in pred[3:]]   # 3 right, 3 wrong
    data = EvalSet(keys=[str(i) for i in range(6)], pixels=pixels, captions=[["x"]] * 6, answers=[None] * 6,
                   labels=gold)
    evaluate = get_task("classify").evaluate
    scores = evaluate(task, data, EvalContext(tokenizer=None, batch_size=4))
    assert scores["top1"] == pytest.approx(50.0)
    assert scores["top4"] == pytest.approx(100.0)         # k = min(5, #classes): every class is in the top 4
    with pytest.raises(ValueError, match="label in every sample"):
        evaluate(task, EvalSet(["0"], pixels[:1], [["x"]], [None], [None]), EvalContext(tokenizer=None))


def test_config_requires_distinct_class_names():
    base = dict(run_name="c", task="classify")
    with pytest.raises(ValueError, match="at least two distinct"):
        TrainConfig.from_dict({**base, "classes": ["a"]})
    with pytest.raises(ValueError, match="at least two distinct"):
        TrainConfig.from_dict({**base, "classes": ["a", "a"]})
    cfg = TrainConfig.from_dict({**base, "classes": ["a", "b"], "label_key": "direction"})
    other = TrainConfig.from_dict({**base, "classes": ["b", "a"], "label_key": "direction"})
    assert cfg.fingerprint() != other.fingerprint()      # class order is the head's order: a different run
