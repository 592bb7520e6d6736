"""Every fine-tuning task learns above chance on its synthetic set, from one shared tiny pretraining
checkpoint: image retrieval, video captioning, video QA by answer-list ranking. Plain single-process loop
(``run_local``); the Ray wiring is covered by the demo and the resume tests. Each figure is printed."""

from __future__ import annotations

import pytest
import torch

from mplug2.train.config import TrainConfig
from mplug2.train.loop import run_local

pytestmark = pytest.mark.slow

PRETRAIN_STEPS, FINETUNE_STEPS = 150, 150
MODEL = {"preset": "tiny", "tokenizer": "bert-base-uncased", "text": {"vocab_size": 30522},
         "queue_size": 64, "momentum": 0.99, "alpha": 0.2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards of every synthetic corpus and a pretrained tiny checkpoint (videos + images)."""
    from pipelines.config import PreprocessConfig
    from pipelines.run import preprocess
    from pipelines.synthetic import make_image_corpus, make_qa_corpus, make_video_corpus

    root = tmp_path_factory.mktemp("tasks")
    media = root / "media"
    manifests = {
        "videos": (make_video_corpus(media, 192, seed=0, size=48, num_frames=12), "video", "train"),
        "videos_eval": (make_video_corpus(media, 72, seed=7, size=48, num_frames=12, split="eval", distinct=True),
                        "video", "eval"),
        "images": (make_image_corpus(media, 192, seed=1, size=48), "image", "train"),
        "images_eval": (make_image_corpus(media, 36, seed=8, size=48, split="eval", distinct=True), "image", "eval"),
        "qa": (make_qa_corpus(media, 192, seed=2, size=48, num_frames=12), "video", "train"),
        "qa_eval": (make_qa_corpus(media, 72, seed=9, size=48, num_frames=12, split="eval", distinct=True),
                    "video", "eval"),
    }
    out = {"runs": str(root / "runs"), "manifests": {k: str(v[0]) for k, v in manifests.items()}}
    for name, (man, modality, split) in manifests.items():
        out[name] = str(root / name)
        summary = preprocess(PreprocessConfig(manifest=[str(man)], output=out[name], modality=modality, split=split,
                                              samples_per_shard=96, num_frames=8, frame_size=32, image_size=32,
                                              resize_mode="center_crop", executor="local", progress=False))
        assert summary.failed == 0
    torch.set_num_threads(1)
    run_local(_cfg(out, "pretrain", PRETRAIN_STEPS, [("videos", 4, 0.7), ("images", 1, 0.3)], None))
    out["init"] = f"{out['runs']}/t-pretrain"
    return out


def _cfg(setup, task, steps, train, eval_name, name=None, **extra) -> TrainConfig:
    return TrainConfig.from_dict(dict(extra,
        run_name=f"t-{name or task}", storage=setup["runs"], task=task, seed=0, model=MODEL,
        init_from=setup.get("init") if task != "pretrain" else None,
        data=dict(train=[dict(name=n, path=setup[n], num_frames=f, weight=w) for n, f, w in train],
                  batch_size=32, shuffle_buffer=64, max_text_len=16,
                  eval=None if eval_name is None else dict(name=eval_name, path=setup[eval_name], split="eval",
                                                           num_frames=train[0][1])),
        optim=dict(lr=2e-3, lr_vision=2e-3, warmup_steps=20),
        schedule=dict(total_steps=steps, ckpt_every_steps=steps, log_every_steps=50),
        scale=dict(num_workers=1)))


def test_image_retrieval_beats_chance(setup, capsys):
    s = run_local(_cfg(setup, "retrieval", FINETUNE_STEPS, [("images", 1, 1.0)], "images_eval", name="img-ret"))
    chance = 100.0 / 36
    with capsys.disabled():
        print(f"\nimage retrieval, 36 held-out images: text→image R@1 {s['eval/img_r1']:.1f} % "
              f"(ITC alone {s['eval/itc_img_r1']:.1f}), image→text R@1 {s['eval/txt_r1']:.1f} % (chance {chance:.1f})")
    assert s["eval/img_r1"] >= 3 * chance, s


def test_captioning_beats_a_constant_caption(setup, capsys):
    from mplug2.eval.caption_metrics import coco_caption_scores
    from mplug2.train.evalset import load_eval_set

    s = run_local(_cfg(setup, "caption", FINETUNE_STEPS, [("videos", 4, 1.0)], "videos_eval"))
    data = load_eval_set(setup["videos_eval"], "eval", 4, 32)
    refs = dict(zip(data.keys, data.captions))
    const = coco_caption_scores(refs, {k: "a big red circle moving left quickly" for k in refs})
    with capsys.disabled():
        print(f"\ncaptioning, 72 held-out clips: CIDEr {100 * s['eval/CIDEr']:.1f}, BLEU-4 {100 * s['eval/Bleu_4']:.1f} "
              f"(one constant caption: CIDEr {100 * const['CIDEr']:.1f}, BLEU-4 {100 * const['Bleu_4']:.1f})")
    assert s["eval/CIDEr"] > 2 * const["CIDEr"] and s["eval/Bleu_4"] > const["Bleu_4"], (s, const)


def test_qa_answer_ranking_beats_guessing(setup, capsys):
    import json

    from pipelines.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

    s = run_local(_cfg(setup, "qa", FINETUNE_STEPS, [("qa", 4, 1.0)], "qa_eval",
                       task_options={"mode": "rank", "k_test": 8}))
    options = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "size": SIZES, "speed": SPEEDS}
    kinds = [json.loads(line)["question_type"] for line in open(setup["manifests"]["qa_eval"])]
    chance = 100.0 * sum(1 / len(options[k]) for k in kinds) / len(kinds)
    with capsys.disabled():
        print(f"\nvideo QA (answer-list ranking), 72 held-out questions: accuracy {s['eval/accuracy']:.1f} % "
              f"(guessing within the question's type {chance:.1f} %)")
    assert s["eval/accuracy"] >= 1.5 * chance, s
