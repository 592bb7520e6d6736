"""The model really learns, by a margin noise cannot explain: tiny pretraining + retrieval fine-tuning at the demo's
budget (200 + 500 steps of 32 clips) on synthetic clips whose captions say what is visible (size, colour, shape,
direction, speed), evaluated on 72 held-out clips that each have their own caption (chance R@1 = 1/72 = 1.4 %),
for three seeds (seed changes the initial weights, the data order, the masks and the negatives). The per-seed
table is printed: ITC alone and after ITM re-ranking, R@1 / R@5 both ways, ITM accuracy and loss after each stage.

Each seed runs in a single-threaded process of its own (all three at once) through the same loop Ray Train workers run
(``run_local``), on shards written by the real pipeline once for all seeds.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local
from pipelines.synthetic import TRAIN_CROP_SCALE

pytestmark = pytest.mark.slow

EVAL_CLIPS = 72   # every (colour, shape, direction) once, size and speed drawn: captions are unique
# MPLUG2_LEARNING_SEEDS=3,4,5 runs other seeds (docs/benchmarks.md reports 0-5); the bars are set for 3 seeds
SEEDS = tuple(int(x) for x in os.environ.get("MPLUG2_LEARNING_SEEDS", "0,1,2").split(","))
PRETRAIN_STEPS, RETRIEVAL_STEPS = 200, 500   # the demo's budget (jobs/demo.py)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_video_corpus

    root = tmp_path_factory.mktemp("learn")
    out = {}
    for name, n, seed, split, distinct in (("train", 256, 0, "train", False), ("eval", EVAL_CLIPS, 4242, "eval", True)):
        man = make_video_corpus(root / "media", n, seed=seed, num_frames=16, size=64, split=split, distinct=distinct)
        out[name] = str(root / name)
        summary = preprocess(PreprocessConfig(manifest=[str(man)], output=out[name], modality="video", split=split,
                                              samples_per_shard=72, num_frames=8, frame_size=32, executor="local",
                                              progress=False))
        assert summary.successes == n
    out["runs"] = str(root / "runs")
    return out


# ITM's gradient is ~1/25 of MLM's at pretraining step 50 (docs/benchmarks.md, issue 14): weighted 4 against 0.5
# for each LM loss. Pretraining draws half its ITM negatives uniformly (captions differing by a single word are
# too hard to start from); retrieval fine-tuning draws them all by ITC similarity (the ITM re-ranks ITC's top-k,
# near-identical candidates) and also shows ITM half of each batch's clips played backwards, each a non-match of
# its own caption (``itm_reversed_negatives``), with a crop that keeps the captions' size and speed true and no
# RandAugment. The temporal modules learn at 10x (``lr_temporal``). All as in the demo. Without the reversed clips
# and the temporal rate, both heads were at chance on held-out clips that differ only in direction, the commonest
# confusion, and ITM added nothing ITC did not have (docs/benchmarks.md, "Stop 26").
LOSS_WEIGHTS = {"itc": 1.0, "itm": 4.0, "mlm": 0.5, "prefix_lm": 0.5}
ITM_RANDOM_NEGATIVES = {"pretrain": 0.5, "retrieval": 0.0}
ITM_REVERSED_NEGATIVES = {"retrieval": 0.5}
AUGMENT = {"retrieval": dict(augment=False, crop_scale=TRAIN_CROP_SCALE)}


def _cfg(corpora, task, steps, init_from=None, seed=0, **extra) -> TrainConfig:
    return TrainConfig.from_dict(dict(extra,
        run_name=f"learn-{task}-s{seed}", storage=corpora["runs"], task=task, init_from=init_from, seed=seed,
        model={"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522, "init_std": 0.18},
               "queue_size": 64, "momentum": 0.99, "alpha": 0.2,
               "itm_random_negatives": ITM_RANDOM_NEGATIVES.get(task, 0.5),
               "itm_reversed_negatives": ITM_REVERSED_NEGATIVES.get(task, 0.0)},
        loss_weights=LOSS_WEIGHTS,
        data=dict(train=[dict(name="videos", path=corpora["train"], num_frames=4)], batch_size=32,
                  shuffle_buffer=64, max_text_len=16, **AUGMENT.get(task, {}),
                  eval=dict(name="eval", path=corpora["eval"], split="eval", num_frames=4)),
        optim=dict(lr=2e-3, lr_vision=2e-3, lr_temporal=2e-2, warmup_steps=20),
        schedule=dict(total_steps=steps, ckpt_every_steps=steps, log_every_steps=50),
        scale=dict(num_workers=1),
        debug=dict(deterministic=True),
    ))


def _seed_run(corpora: dict, seed: int) -> dict:
    """Pretraining then retrieval fine-tuning for one seed (a single-threaded process of its own)."""
    torch.set_num_threads(1)
    pre = run_local(_cfg(corpora, "pretrain", PRETRAIN_STEPS, seed=seed))
    s = run_local(_cfg(corpora, "retrieval", RETRIEVAL_STEPS, seed=seed,
                       init_from=f"{corpora['runs']}/learn-pretrain-s{seed}"))
    return {"seed": seed, "loss_pretrain": pre["loss/loss"],
            "t2v_r1": s["eval/img_r1"], "t2v_r1_itc": s["eval/itc_img_r1"],
            "t2v_r5": s["eval/img_r5"], "t2v_r5_itc": s["eval/itc_img_r5"],
            "v2t_r1": s["eval/txt_r1"], "v2t_r1_itc": s["eval/itc_txt_r1"],
            "v2t_r5": s["eval/txt_r5"], "v2t_r5_itc": s["eval/itc_txt_r5"],
            "itm_acc_pretrain": pre.get("itm_acc", float("nan")), "itm_acc": s.get("itm_acc", float("nan")),
            "itm_loss_pretrain": pre.get("loss/itm", float("nan")), "itm_loss": s.get("loss/itm", float("nan")),
            "itm_hard_pair_acc": s["eval/itm_hard_pair_acc"], "itm_hard_acc": s["eval/itm_hard_acc"],
            "itc_hard_pair_acc": s["eval/itc_hard_pair_acc"]}


@pytest.fixture(scope="module")
def seed_rows(corpora) -> list[dict]:
    """The three seeds' figures, run once for the tests below."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        # One single-threaded process per seed, all at once: two at a time left a core idle while the third ran
        # alone (a third of the test's time); three processes on two cores keep both busy to the end.
        with ProcessPoolExecutor(max_workers=len(SEEDS), mp_context=multiprocessing.get_context("spawn")) as pool:
            return sorted(pool.map(_seed_run, [corpora] * len(SEEDS), SEEDS), key=lambda r: r["seed"])


@pytest.mark.timeout(2400)   # 3 seeds at the demo's budget: ~4-8 min on 2 quiet cores, past the default 900 s under load
def test_pretrain_then_retrieval_learns_far_above_chance(seed_rows, corpora, capsys):
    rows = seed_rows
    chance = 100.0 / EVAL_CLIPS
    for r in rows:
        assert r["loss_pretrain"] < 16.0, r        # from ~26 at step 1: all four objectives fall
    with capsys.disabled():
        print(f"\ntext<->video retrieval on {EVAL_CLIPS} held-out clips (chance R@1 {chance:.1f} %, R@5 "
              f"{5 * chance:.1f} %), {PRETRAIN_STEPS} pretraining + {RETRIEVAL_STEPS} retrieval steps of 32 clips; "
              "re-ranked (ITC alone)")
        print(f"{'seed':>4s} {'t2v R@1':>13s} {'t2v R@5':>13s} {'v2t R@1':>13s} {'v2t R@5':>13s} "
              f"{'ITM acc pre/ret':>16s} {'ITM loss pre/ret':>17s} {'held-out hard pairs: own first ITM (ITC) / ITM acc':>51s}")
        for r in rows:
            cells = " ".join(f"{r[k]:5.1f} ({r[k + '_itc']:5.1f})" for k in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5"))
            print(f"{r['seed']:4d} {cells} {r['itm_acc_pretrain']:8.3f}/{r['itm_acc']:.3f} "
                  f"{r['itm_loss_pretrain']:11.3f}/{r['itm_loss']:.3f} "
                  f"{r['itm_hard_pair_acc']:34.1f} ({r['itc_hard_pair_acc']:4.1f}) / {r['itm_hard_acc']:.1f}")
        print("held-out hard pairs: each caption with its own clip and ITC's 2 nearest wrong clips; own ranked first "
              "by a random head 50 %; ITM argmax accuracy: 66.7 % always 'no match'")
    t2v = [r["t2v_r1"] for r in rows]
    # issue 14's bars, all met: with the reversed clips and the temporal rate (2026-12-04, docs/benchmarks.md
    # "Stop 26") t2v R@1 80.6 / 79.2 / 77.8 % (seeds 3-5: 70.8 / 79.2 / 90.3); before them (Stop 25) 50.0 / 40.3 /
    # 55.6 on this host, 44.4 / 34.7 / 51.4 to 51.4 / 38.9 / 44.4 with MKL / oneDNN / ATen held to other code
    # paths; with ALBEF's crop and RandAugment, hard negatives only: 43.1 / 22.2 / 43.1 (2026-12-02)
    assert statistics.median(t2v) >= 25.0, rows                  # >= 18x chance on 72 clips
    assert min(t2v) >= 12.0, rows
    assert min(r["t2v_r5"] for r in rows) >= 15 * chance, rows    # the bar this test held before issue 14
    # ITM leaves its 1:2 prior (loss 0.636): pretraining ITM loss 0.463 / 0.465 / 0.421 (half its negatives
    # uniform); retrieval's last batch (every negative a word or two from the caption, plus half the clips played
    # backwards: 0.598 for "always no match") ends at 0.318 / 0.312 / 0.224. Issue 14's bar (< 0.50), loosened to
    # < 0.60 and dropped while ALBEF's crop made size and speed unreadable, is back; retrieval medians were
    # 0.464-0.490 on every host and code path tried before the reversed clips.
    assert statistics.median(r["itm_loss_pretrain"] for r in rows) < 0.55, rows
    assert statistics.median(r["itm_loss"] for r in rows) < 0.50, rows
    # the export carries the trained ITC/ITM heads, so inference embeddings are the ones evaluation ranked with
    from mplug2.inference import Predictor

    assert Predictor.load(f"{corpora['runs']}/learn-retrieval-s{SEEDS[-1]}/best").heads_trained


# Issue 14's acceptance 1: ITM re-ranking improves R@1 over ITC alone. Measured with the reversed clips in retrieval
# (2026-12-04, docs/benchmarks.md "Stop 26"), re-ranked minus ITC-alone R@1 per seed, text->video / video->text:
# seeds 0-2 -1.4 / +5.6, +8.3 / +2.8, +1.4 / +1.4; seeds 3-5 (same code, other seeds) +4.2 / +6.9, +1.4 / 0,
# +6.9 / +4.2: 10 of 12 comparisons up, one tie, mean +3.5 points (one clip is 1.4). Without the reversed clips
# the same differences were -2.8 to +2.8 around 0 (Stop 25), and this test was marked xfail.
@pytest.mark.timeout(2400)
def test_itm_re_ranking_beats_itc_alone_on_held_out_clips(seed_rows, capsys):
    rows = seed_rows
    gains = [r[f"{d}_r1"] - r[f"{d}_r1_itc"] for r in rows for d in ("t2v", "v2t")]
    with capsys.disabled():
        print("R@1 re-ranked minus ITC alone per seed (t2v, v2t): "
              + ", ".join(f"{a:+.1f} / {b:+.1f}" for a, b in zip(gains[::2], gains[1::2]))
              + f"; mean {statistics.mean(gains):+.1f} points")
    assert statistics.mean(gains) > 0.0, rows                     # better over both directions and every seed
    for d in ("t2v", "v2t"):                                       # and never worse in either direction
        assert statistics.median(r[f"{d}_r1"] for r in rows) >= statistics.median(r[f"{d}_r1_itc"] for r in rows), rows
    # retrieval's last-batch ITM argmax accuracy (1:2 pairs; the prior 0.667): 0.812 / 0.854 / 0.906 (seeds 3-5
    # 0.802 / 0.802 / 0.927)
    assert statistics.median(r["itm_acc"] for r in rows) > 2 / 3 + 0.05, rows
    # held-out hard pairs (each caption's own clip against ITC's 2 nearest wrong clips, a random head 50 %,
    # binomial std ~3 points on 144 pairs): ITM 84.7 / 86.1 / 86.8 % (seeds 3-5 72.9 / 81.9 / 92.4). Alone, ITM
    # ties ITC on these pairs (ITC 89.6 / 79.9 / 86.1, seeds 3-5 77.1 / 88.9 / 90.3): the two heads err on
    # different pairs, and their sum ranks better than either (the gains above). Was >= 60 before the reversed clips.
    assert statistics.median(r["itm_hard_pair_acc"] for r in rows) >= 70.0, rows


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
    best = f"{corpora['runs']}/learn-classify-s0/best"
    assert json.loads(open(f"{best}/classes.json").read()) == list(DIRECTIONS)
    capsys.readouterr()
    assert train_cli(["evaluate", "--task", "classify", "--model", best, "--eval", corpora["eval"], "--split", "eval",
                      "--label-key", "direction"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(scores["eval/top1"])
