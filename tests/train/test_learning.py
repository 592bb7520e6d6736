"""The model really learns: tiny pretraining + retrieval fine-tuning on synthetic clips whose captions describe
what is visible (colour, shape, motion direction) beats chance text→video retrieval on held-out clips
(the issue's target, R@1 >= 5x chance, is asserted; the note in the test gives the numbers seen).

Runs in one process through the same loop Ray Train workers run (``run_local``), on shards written by the
real pipeline. Held-out clips are drawn with another seed; their captions are all different, so chance
R@1 = 1 / #clips.
"""

from __future__ import annotations

import pytest
import torch

from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local

pytestmark = pytest.mark.slow

EVAL_CLIPS = 72   # every (colour, shape, direction) combination once: captions are unique


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_video_corpus

    root = tmp_path_factory.mktemp("learn")
    out = {}
    for name, n, seed, split in (("train", 256, 0, "train"), ("eval", EVAL_CLIPS, 4242, "eval")):
        man = make_video_corpus(root / "media", n, seed=seed, num_frames=16, size=64, split=split)
        out[name] = str(root / name)
        summary = preprocess(PreprocessConfig(manifest=[str(man)], output=out[name], modality="video", split=split,
                                              samples_per_shard=72, num_frames=8, frame_size=32, executor="local",
                                              progress=False))
        assert summary.successes == n
    out["runs"] = str(root / "runs")
    return out


def _cfg(corpora, task, steps, init_from=None, **extra) -> TrainConfig:
    return TrainConfig.from_dict(dict(extra,
        run_name=f"learn-{task}", storage=corpora["runs"], task=task, init_from=init_from, seed=0,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522},
               "queue_size": 64, "momentum": 0.99, "alpha": 0.2},
        loss_weights={"itc": 1.0, "itm": 1.0, "mlm": 1.0, "prefix_lm": 1.0},
        data=dict(train=[dict(name="videos", path=corpora["train"], num_frames=4)], batch_size=32,
                  shuffle_buffer=64, max_text_len=16,
                  eval=dict(name="eval", path=corpora["eval"], split="eval", num_frames=4)),
        optim=dict(lr=2e-3, lr_vision=2e-3, warmup_steps=20),
        schedule=dict(total_steps=steps, ckpt_every_steps=steps, log_every_steps=50),
        scale=dict(num_workers=1),
        debug=dict(deterministic=True),
    ))


def test_pretrain_then_retrieval_beats_chance(corpora, monkeypatch):
    # Seen (200 pretraining + 1600 retrieval steps, four seeds): R@1 16.7 / 22.2 / 55.6 / 16.7 % against a bar
    # of 6.9 % (5x chance); with 1200 steps 9.7-19.4 %. Runs are bitwise reproducible for the same corpus
    # bytes; the corpus is rebuilt in a new tmp folder per run, and its absolute paths in each sample's json
    # shift the last float bits by step 20, which training amplifies to seed-level variance. Before the flip
    # fix (a flipped clip kept "moving left") and with 600 retrieval steps, R@1 was 4.2-11.1 %.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    pre = run_local(_cfg(corpora, "pretrain", 200))
    assert pre["loss/loss"] < 16.0, pre        # from ~26 at step 1: all four objectives fall
    scores = run_local(_cfg(corpora, "retrieval", 1600, init_from=f"{corpora['runs']}/learn-pretrain"))
    chance = 100.0 / EVAL_CLIPS
    t2v_r1, t2v_r5 = scores["eval/img_r1"], scores["eval/img_r5"]
    print(f"\ntext→video on {EVAL_CLIPS} held-out clips: R@1 {t2v_r1:.1f} %, R@5 {t2v_r5:.1f} %, "
          f"R@10 {scores['eval/img_r10']:.1f} % (chance R@1 {chance:.1f} %); "
          f"video→text R@1 {scores['eval/txt_r1']:.1f} %")
    assert t2v_r1 >= 5 * chance, scores
    assert t2v_r5 >= 3 * 5 * chance, scores
    # the export carries the trained ITC/ITM heads, so inference embeddings are the ones evaluation ranked with
    from mplug2.inference import Predictor

    assert Predictor.load(f"{corpora['runs']}/learn-retrieval/best").heads_trained


def test_classification_finetune_learns_labels_from_json(corpora, monkeypatch, capsys):
    """``task: classify`` reads each clip's label from its json (here the pipeline kept the manifest's
    ``direction`` column), trains the linear head with the encoder, beats chance top-1 on held-out clips, and
    its best export scores the same through ``mplug2-train evaluate``."""
    import json

    from mplug2.train.cli import main as train_cli
    from pipelines.synthetic import DIRECTIONS

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cfg = _cfg(corpora, "classify", 300, classes=list(DIRECTIONS), label_key="direction")
    scores = run_local(cfg)
    chance = 100.0 / len(DIRECTIONS)
    with capsys.disabled():
        print(f"\nmotion direction on {EVAL_CLIPS} held-out clips: top-1 {scores['eval/top1']:.1f} % "
              f"(chance {chance:.0f} %)")
    assert scores["eval/top1"] >= 2 * chance, scores
    best = f"{corpora['runs']}/learn-classify/best"
    assert json.loads(open(f"{best}/classes.json").read()) == list(DIRECTIONS)
    capsys.readouterr()
    assert train_cli(["evaluate", "--task", "classify", "--model", best, "--eval", corpora["eval"], "--split", "eval",
                      "--label-key", "direction"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(scores["eval/top1"])
