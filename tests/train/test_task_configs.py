"""Every task from a config: each ``configs/*_tiny.yaml`` fine-tuning config names a registered task with
valid options, ``mplug2-train finetune --help`` lists the registry's tasks, and QA evaluates by generation or
by answer-list ranking, with VQA accuracy when questions carry human answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.tokenizer import load_tokenizer
from mplug2.train.cli import main as train_cli
from mplug2.train.config import TrainConfig
from mplug2.train.evalset import EvalSet
from mplug2.train.tasks import REGISTRY, EvalContext, QAOptions, RetrievalOptions, get_task
from tests.tiny import one_thread  # noqa: F401  (fixture)

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*_tiny.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_tiny_config_names_a_registered_task(path):
    cfg = TrainConfig.from_yaml(path)
    spec = get_task(cfg.task)
    if cfg.task != "pretrain":
        assert spec.evaluate is not None and cfg.data.eval is not None and cfg.init_from
    cfg.options        # typed options parse


def test_every_finetuning_task_has_a_config():
    tasks = {TrainConfig.from_yaml(p).task for p in CONFIGS}
    assert {name for name, s in REGISTRY.items()} <= tasks


def test_finetune_help_lists_the_registry(capsys):
    with pytest.raises(SystemExit):
        train_cli(["finetune", "--help"])
    out = capsys.readouterr().out
    for name, spec in REGISTRY.items():
        if spec.evaluate is not None:
            assert f"  {name} " in out


def test_task_options_are_typed_and_checked():
    cfg = TrainConfig(run_name="r", task="retrieval", task_options={"k_test": 32})
    assert cfg.options == RetrievalOptions(k_test=32)
    with pytest.raises(ValueError, match="unknown task_options"):
        TrainConfig(run_name="r", task="retrieval", task_options={"depth": 3})
    with pytest.raises(ValueError, match="takes no task_options"):
        TrainConfig(run_name="r", task="caption", task_options={"k_test": 3})
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(run_name="r", task="qa", task_options={"mode": "guess"})


def test_qa_answer_list_ranking_and_vqa_accuracy(one_thread):
    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    cfg = TrainConfig(run_name="q", task="qa", model="tiny", task_options={"mode": "rank", "k_test": 3})
    spec = get_task("qa")
    task = spec.build(cfg, MPLUG2(MPLUG2Config.preset("tiny")), tok, 1).eval()
    humans = [["red"] * 10, ["blue"] * 7 + ["red"] * 3, ["left"] * 2 + ["red"] * 8]
    data = EvalSet(keys=["a", "b", "c"], pixels=torch.randn(3, 3, 2, 32, 32),
                   captions=[["what colour"], ["what colour"], ["which way"]], answers=["red", "blue", "left"],
                   answer_lists=humans)
    with torch.no_grad():
        ranked = spec.evaluate(task, data, EvalContext(tok, max_text_len=12, options=cfg.options))
        generated = spec.evaluate(task, data, EvalContext(tok, max_text_len=12, options=QAOptions()))
    assert set(ranked) == set(generated) == {"accuracy", "vqa_accuracy"}
    # ranking picks from the list {red, blue, left}: every prediction is one of them, so the VQA score of
    # each question is one of its few possible values
    from mplug2.eval.qa_metrics import vqa_score

    possible = [{vqa_score(c, h) for c in ("red", "blue", "left")} for h in humans]
    total = ranked["vqa_accuracy"] * 3 / 100
    assert any(abs(total - (a + b + c)) < 1e-6 for a in possible[0] for b in possible[1] for c in possible[2])
