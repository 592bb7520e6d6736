"""Visual grounding end to end: a RefCOCO-style manifest of the synthetic two-shape images goes through the
real pipeline (``--preset refcoco``: the box travels in each sample's json), a tiny model is pretrained on it
and fine-tuned with ``task: grounding`` through the training loop, and on held-out images its acc@IoU>=0.5
clearly beats chance, defined as the best accuracy one fixed box reaches on the eval set (the box chosen
knowing the answers). Every image holds two shapes of different colours, so the expression must be read."""
from __future__ import annotations

import pytest
import torch

from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local
from tests.tiny import one_thread  # noqa: F401  (fixture)

TRAIN_IMAGES, EVAL_IMAGES = 384, 96
PRETRAIN_STEPS, GROUNDING_STEPS = 30, 300
SEED = 0


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_grounding_corpus

    root = tmp_path_factory.mktemp("ground")
    out = {"runs": str(root / "runs")}
    for split, n, seed in (("train", TRAIN_IMAGES, 3), ("eval", EVAL_IMAGES, 99)):
        man = make_grounding_corpus(root / "media", n, seed=seed, size=64, split=split)
        out[split], out[f"{split}_manifest"] = str(root / split), str(man)
        summary = preprocess(PreprocessConfig(manifest=[str(man)], output=out[split], preset="refcoco", split=split,
                                              image_size=32, samples_per_shard=128, executor="local",
                                              progress=False))
        assert summary.successes == n
    return out


def _cfg(corpora, task: str, steps: int, **extra) -> TrainConfig:
    return TrainConfig.from_dict(dict(extra,
        run_name=f"ground-{task}", storage=corpora["runs"], task=task,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522},
               "queue_size": 64, "momentum": 0.99, "alpha": 0.2},
        data=dict(train=[dict(name="grounding", path=corpora["train"], num_frames=1)], batch_size=32,
                  shuffle_buffer=64, max_text_len=12, augment=False,
                  eval=dict(name="eval", path=corpora["eval"], split="eval", num_frames=1)),
        optim=dict(lr=2e-3, lr_vision=2e-3, warmup_steps=20),
        schedule=dict(total_steps=steps, ckpt_every_steps=steps, log_every_steps=100),
        scale=dict(num_workers=1), debug=dict(deterministic=True), seed=SEED))


def test_grounding_finetune_beats_the_best_fixed_box(corpora, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_local(_cfg(corpora, "pretrain", PRETRAIN_STEPS, loss_weights={"itc": 1.0, "itm": 1.0, "mlm": 1.0,
                                                                        "prefix_lm": 1.0}))
    scores = run_local(_cfg(corpora, "grounding", GROUNDING_STEPS, loss_weights={}, task_options={"head": "regression"},
                            init_from=f"{corpora['runs']}/ground-pretrain"))
    acc, chance, miou = scores["eval/acc_iou50"], scores["eval/chance_acc"], scores["eval/mean_iou"]
    with capsys.disabled():
        print(f"\ngrounding on {EVAL_IMAGES} held-out images: acc@IoU>=0.5 {acc:.1f} % (best fixed box {chance:.1f} %), "
              f"mean IoU {miou:.1f} %; {PRETRAIN_STEPS} pretraining + {GROUNDING_STEPS} grounding steps of 32")
    assert 0 < chance < 50, scores          # two shapes anywhere in the image: no one box fits most of them
    assert acc >= 2 * chance and acc >= chance + 15, scores
    # the best export records its head: `mplug2-train evaluate` rebuilds it and scores the same
    import json

    from mplug2.train.cli import main as train_cli

    capsys.readouterr()
    assert train_cli(["evaluate", "--task", "grounding", "--model", f"{corpora['runs']}/ground-grounding/best",
                      "--eval", corpora["eval"], "--split", "eval", "--frames", "1", "--max-text-len", "12"]) == 0
    assert json.loads(capsys.readouterr().out)["acc_iou50"] == pytest.approx(acc)

    # `mplug2-model ground` on the held-out images themselves (the user's path: raw files, the inference
    # loader's own resize, boxes mapped back to each image's pixels) finds the named shape as often
    from mplug2.cli import main as model_cli
    from mplug2.tasks.grounding import box_iou, xywh_to_xyxy

    rows = [json.loads(line) for line in open(corpora["eval_manifest"])]
    argv = ["ground", *[r["image"] for r in rows], "--model", f"{corpora['runs']}/ground-grounding/best", "--json"]
    for r in rows:
        argv += ["--expression", r["expression"]]
    assert model_cli(argv) == 0
    out = {o["input"]: o for o in map(json.loads, capsys.readouterr().out.splitlines())}
    assert [out[r["image"]]["expression"] for r in rows] == [r["expression"] for r in rows]
    pred = xywh_to_xyxy(torch.tensor([out[r["image"]]["box"] for r in rows], dtype=torch.float32))
    gold = xywh_to_xyxy(torch.tensor([r["bbox"] for r in rows], dtype=torch.float32))
    cli_acc = 100.0 * float((box_iou(pred, gold) >= 0.5).float().mean())
    with capsys.disabled():
        print(f"mplug2-model ground on the same {EVAL_IMAGES} image files: acc@IoU>=0.5 {cli_acc:.1f} %")
    assert cli_acc >= 2 * chance and cli_acc >= chance + 15, (cli_acc, scores)


def test_evaluation_scores_the_predicted_boxes_and_names_chance(one_thread):
    from mplug2.config import MPLUG2Config
    from mplug2.models.mplug2 import MPLUG2
    from mplug2.tasks.grounding import box_iou
    from mplug2.tokenizer import load_tokenizer
    from mplug2.train.evalset import EvalSet
    from mplug2.train.tasks import EvalContext, get_task

    torch.manual_seed(0)
    tok = load_tokenizer("tiny")
    spec = get_task("grounding")
    for head in ("tokens", "regression"):
        cfg = TrainConfig.from_dict({"run_name": "g", "task": "grounding", "model": "tiny",
                                     "task_options": {"head": head}, "data": {"augment": False}})
        task = spec.build(cfg, MPLUG2(MPLUG2Config.preset("tiny")), tok, 1).eval()
        pixels = torch.randn(5, 3, 1, 32, 32)
        enc = tok(["the red one"] * 5, max_length=8)
        pred = task.predict(pixels, enc["input_ids"], enc["attention_mask"])
        assert pred.shape == (5, 4) and (pred[:, 2:] >= pred[:, :2]).all() and (pred >= 0).all()
        gold = [tuple(pred[0].tolist())] * 2 + [(0.0, 0.0, 0.1, 0.1), (0.9, 0.9, 1.0, 1.0), (0.0, 0.5, 0.5, 1.0)]
        data = EvalSet([str(i) for i in range(5)], pixels, [["the red one"]] * 5, [None] * 5, boxes=gold)
        scores = spec.evaluate(task, data, EvalContext(tok, max_text_len=8, batch_size=2, options=cfg.options))
        iou = box_iou(pred, torch.tensor(gold))
        assert scores["acc_iou50"] == pytest.approx(100 * float((iou >= 0.5).float().mean()))
        assert scores["acc_iou50"] >= 40 and scores["mean_iou"] == pytest.approx(100 * float(iou.mean()), abs=1e-4)
        assert scores["chance_acc"] == pytest.approx(40.0)     # the repeated box: 2 of 5 with one fixed box
    with pytest.raises(ValueError, match="data.augment: false"):   # a training run; evaluation has no train data
        TrainConfig.from_dict({"run_name": "g", "task": "grounding", "data": {"train": [{"name": "g", "path": "x"}]}})
    with pytest.raises(ValueError, match="head must be one of"):
        TrainConfig.from_dict({"run_name": "g", "task": "grounding", "task_options": {"head": "magic"},
                               "data": {"augment": False}})
