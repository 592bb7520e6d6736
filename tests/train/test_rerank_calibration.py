"""The re-rank's ITM weight (``sim/T + w · log p(match)``) is chosen on a validation corpus, never on the eval
corpus, and travels with the export: evaluation, ``mplug2-train evaluate`` and inference score with the weight the
run chose. Issue 14: a weight that made re-ranking beat ITC could only be read off the test clips before."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.eval.retrieval_metrics import retrieval_recall
from mplug2.models.mplug2 import MPLUG2
from mplug2.tasks.retrieval import (RERANK_ITM_WEIGHTS, RetrievalConfig, Retriever, choose_itm_weight,
                                    rerank_hits)
from mplug2.train.config import TrainConfig
from tests.data.shards_fixture import write_shards
from tests.tiny import distinct_pixels, one_thread, tok  # noqa: F401  (fixtures)


def test_the_best_weight_wins_ties_go_to_one_and_a_useless_itm_head_gets_zero():
    weights = (0.0, 0.5, 1.0, 2.0, 4.0)
    # hits per weight: (item->text of 10 items, text->item of 20 texts)
    better_at_4 = torch.tensor([[5, 10], [5, 10], [6, 10], [6, 12], [7, 12]])
    assert choose_itm_weight(better_at_4, 10, 20, weights)[0] == 4.0
    flat = torch.tensor([[5, 10]] * 5)                      # the weight changes nothing: the default stays
    assert choose_itm_weight(flat, 10, 20, weights)[0] == 1.0
    tie_far = torch.tensor([[5, 10], [6, 12], [5, 10], [5, 10], [6, 12]])   # 0.5 and 4 tie: the nearer to 1
    assert choose_itm_weight(tie_far, 10, 20, weights)[0] == 0.5
    harmful = torch.tensor([[8, 16], [7, 14], [6, 12], [5, 10], [4, 8]])   # ITM only hurts: ITC's order
    weight, r1 = choose_itm_weight(harmful, 10, 20, weights)
    assert weight == 0.0 and r1[0.0] == pytest.approx(80.0) and r1[4.0] == pytest.approx(40.0)


def test_calibration_counts_the_hits_evaluation_reports_at_every_weight(tok, one_thread):
    """The hits the calibration compares are evaluation's R@1 at that weight, query by query."""
    torch.manual_seed(3)
    ret = Retriever(MPLUG2(MPLUG2Config.preset("tiny")), tok, RetrievalConfig(k_test=4, queue_size=0,
                                                                               distill=False)).eval()
    caps = ["a red circle", "a blue square", "a green circle moving left", "a red square", "a blue circle",
            "a green square moving right"]
    enc = tok(caps, max_length=12)
    pixels = distinct_pixels(6)
    vis, vmask, f_v, text, f_t = ret.encode(pixels, enc["input_ids"], enc["attention_mask"])
    sim = f_v.float() @ f_t.float().t()
    rows = range(6)
    i2t_c, t2i_c = ret.candidates(sim, vis, vmask, text, enc["attention_mask"], rows, rows, k=4)
    assert not torch.equal(i2t_c.itm_logp, torch.zeros_like(i2t_c.itm_logp))
    hits = rerank_hits(i2t_c, t2i_c, rows, rows, list(rows))
    for w, (txt_hits, img_hits) in zip(RERANK_ITM_WEIGHTS, hits.tolist()):
        ret.cfg.rerank_itm_weight = w
        i2t, t2i = ret.rerank(sim, vis, vmask, text, enc["attention_mask"], rows, rows, k=4)
        recall = retrieval_recall(i2t, list(rows), sim_t2i=t2i)
        assert recall["txt_r1"] == pytest.approx(100 * txt_hits / 6) and recall["img_r1"] == pytest.approx(
            100 * img_hits / 6), w
        if w == 0.0:     # weight 0: ITC's own order
            assert torch.equal(i2t.argmax(1), sim.argmax(1)) and torch.equal(t2i.argmax(1), sim.t().argmax(1))


def test_a_run_with_a_validation_corpus_chooses_the_weight_there_and_exports_it(tmp_path, one_thread):
    from mplug2.inference.predictor import Predictor
    from mplug2.train.build import load_exported_task
    from mplug2.train.evalset import load_eval_set
    from mplug2.train.loop import run_local
    from mplug2.train.tasks import EvalContext, get_task

    for name, seed in (("train", 0), ("val", 1), ("eval", 2)):
        write_shards(str(tmp_path / name), [8, 6], split="train" if name == "train" else "eval", seed=seed,
                     size=(40, 36))
    cfg = TrainConfig.from_dict(dict(
        run_name="cal", storage=str(tmp_path / "runs"), task="retrieval", seed=0,
        model={"preset": "tiny", "queue_size": 16},
        data=dict(train=[dict(name="images", path=str(tmp_path / "train"), num_frames=1)], batch_size=4,
                  shuffle_buffer=8, max_text_len=12,
                  eval=dict(name="eval", path=str(tmp_path / "eval"), split="eval", num_frames=1),
                  val=dict(name="val", path=str(tmp_path / "val"), split="eval", num_frames=1)),
        optim=dict(warmup_steps=1), schedule=dict(total_steps=3, ckpt_every_steps=3), scale=dict(num_workers=1)))
    last = run_local(cfg)
    weight = last["eval/rerank_itm_weight"]
    assert weight in RERANK_ITM_WEIGHTS
    assert {"eval/val_rerank_r1_mean", "eval/val_itc_r1_mean", "eval/val_rerank_r1_mean_at_1"} <= set(last)

    # the export carries the weight: inference and `mplug2-train evaluate` rebuild the same re-rank
    final = str(tmp_path / "runs" / "cal" / "final")
    assert Predictor.load(final).retriever.cfg.rerank_itm_weight == weight
    exported = load_exported_task(final, "retrieval")
    assert exported.module.cfg.rerank_itm_weight == weight

    # ... and it is the validation corpus' choice: recomputed there from the exported model
    spec, module = get_task("retrieval"), exported.module
    val = load_eval_set(str(tmp_path / "val"), "eval", 1, module.model.config.vision.image_res)
    ctx = EvalContext(exported.tokenizer, max_text_len=12, options=exported.config.options)
    module.cfg.rerank_itm_weight = -1.0                      # overwritten by the calibration
    with torch.no_grad():
        chosen = spec.calibrate(module, val, ctx)
    assert module.cfg.rerank_itm_weight == weight
    assert chosen["val_rerank_r1_mean"] == pytest.approx(last["eval/val_rerank_r1_mean"])


def test_only_tasks_with_a_calibration_take_a_validation_corpus():
    val = {"name": "val", "path": "/data/val", "split": "eval"}
    assert TrainConfig.from_dict({"run_name": "r", "task": "retrieval", "data": {"val": val}}).data.val.path == \
        "/data/val"
    with pytest.raises(ValueError, match=r"data\.val: task 'caption' tunes nothing.*retrieval"):
        TrainConfig.from_dict({"run_name": "r", "task": "caption", "data": {"val": val}})
    with pytest.raises(ValueError, match="rerank_itm_weight must be >= 0"):
        TrainConfig(run_name="r", task="retrieval", task_options={"rerank_itm_weight": -1})
