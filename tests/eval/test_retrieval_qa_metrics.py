"""Retrieval recall on hand-made similarity matrices; QA exact match and VQA soft accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mplug2.eval.qa_metrics import exact_match_accuracy, normalize_vqa_answer, vqa_accuracy, vqa_score
from mplug2.eval.retrieval_metrics import (hard_pair_itc, hard_pair_wrong_items, itm_hard_pair_metrics,
                                          retrieval_ranks, retrieval_recall)


def test_identity_matrix_is_perfect():
    r = retrieval_recall(torch.eye(4), [0, 1, 2, 3])
    assert r["txt_r1"] == r["img_r1"] == r["r_mean"] == 100.0


def test_hand_made_ranks_one_caption_each():
    # items x texts; correct pairs on the diagonal.
    sim = np.array([[0.9, 0.1, 0.2],    # item 0: its text ranks 1st
                    [0.8, 0.5, 0.7],    # item 1: text 1 (0.5) ranks 3rd among texts
                    [0.1, 0.3, 0.2]])   # item 2: text 2 (0.2) ranks 2nd
    i2t, t2i = retrieval_ranks(sim, [0, 1, 2])
    assert i2t.tolist() == [0, 2, 1]
    # text 0: col [.9,.8,.1], own .9 -> 0; text 1: [.1,.5,.3] own .5 -> 0; text 2: [.2,.7,.2] own .2 -> 1 (.7) + tie -> 2
    assert t2i.tolist() == [0, 0, 2]
    r = retrieval_recall(sim, [0, 1, 2], ks=(1, 2))
    assert r["txt_r1"] == pytest.approx(100 / 3) and r["txt_r2"] == pytest.approx(200 / 3)
    assert r["img_r1"] == pytest.approx(200 / 3) and r["img_r2"] == pytest.approx(200 / 3)


def test_multiple_captions_per_item():
    # 2 videos, 4 captions: captions 0,1 -> video 0; 2,3 -> video 1.
    sim = np.array([[0.1, 0.9, 0.8, 0.2],   # video 0: best own caption (0.9) is rank 0
                    [0.7, 0.6, 0.5, 0.4]])  # video 1: best own caption 0.5; wrong 0.7, 0.6 above -> rank 2
    i2t, t2i = retrieval_ranks(sim, [0, 0, 1, 1])
    assert i2t.tolist() == [0, 2]
    assert t2i.tolist() == [1, 0, 1, 0]


def test_constant_matrix_is_not_perfect():
    r = retrieval_recall(np.zeros((5, 5)), list(range(5)))
    assert r["txt_r1"] == 0.0 and r["img_r1"] == 0.0 and r["txt_r5"] == 100.0


def test_bad_mapping_fails():
    with pytest.raises(ValueError, match="entries"):
        retrieval_recall(np.eye(3), [0, 1])
    with pytest.raises(ValueError, match="no text"):
        retrieval_recall(np.eye(3), [0, 1, 1])


def test_exact_match():
    assert exact_match_accuracy(["Dog ", "cat", "red"], ["dog", "dog", ["red", "crimson"]]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        exact_match_accuracy(["a"], [])


def test_vqa_soft_accuracy():
    answers = ["two"] * 3 + ["2"] + ["three"] * 6      # "two" normalises to "2": 4 matches
    assert vqa_score("2", answers) == 1.0
    two_of_ten = ["yes", "yes"] + ["no"] * 8
    # leave-one-out: 2 subsets drop a "yes" (1 match -> 1/3), 8 keep both (2/3)
    assert vqa_score("yes", two_of_ten) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_score("maybe", two_of_ten) == 0.0
    assert normalize_vqa_answer("The Two dogs!") == "2 dogs"
    assert vqa_accuracy(["yes", "maybe"], [["yes"] * 10, ["no"] * 10]) == 50.0


def test_separate_text_to_item_matrix():
    sim_i2t = np.eye(3)
    sim_t2i = np.array([[0.1, 0.9, 0.0],   # text 0 prefers item 1 -> rank 1
                        [0.0, 1.0, 0.0],
                        [0.0, 0.0, 1.0]])
    r = retrieval_recall(sim_i2t, [0, 1, 2], ks=(1,), sim_t2i=sim_t2i)
    assert r["txt_r1"] == 100.0 and r["img_r1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="sim_t2i"):
        retrieval_recall(sim_i2t, [0, 1, 2], sim_t2i=np.eye(2))


def test_hard_pairs_are_itcs_nearest_wrong_items_and_scored_by_rank_and_by_argmax():
    # items x texts; items 0 and 1 both own text columns (1 owns two), item 2 owns the last
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5],
                        [0.7, 0.6, 0.7, 0.4],
                        [0.2, 0.9, 0.3, 0.8]])
    wrong = hard_pair_wrong_items(sim, [0, 1, 1, 2], hard=2)
    assert wrong.tolist() == [[1, 2], [2, 0], [2, 0], [0, 1]]   # never the text's own item
    with pytest.raises(ValueError):
        hard_pair_wrong_items(sim, [0, 1, 1, 2], hard=3)
    logp = torch.log(torch.tensor([[0.6, 0.2, 0.3],      # own first, all three on the right side of 0.5
                                   [0.4, 0.45, 0.1]]))   # one of two pairs ranked right; "no match" to its own
    m = itm_hard_pair_metrics(logp)
    assert m["itm_hard_pair_acc"] == pytest.approx(75.0) and m["itm_hard_acc"] == pytest.approx(500 / 6)
    # a head that always answers "no match" scores the 1:2 prior on argmax and cannot rank own above wrong
    never = itm_hard_pair_metrics(torch.log(torch.full((4, 3), 0.1)))
    assert never["itm_hard_acc"] == pytest.approx(200 / 3) and never["itm_hard_pair_acc"] == 0.0
    # ITC's own figure on its own hardest pairs: texts 0, 2, 3 rank their item first, text 1 (0.6 < 0.9) does not
    itc = hard_pair_itc(sim, [0, 1, 1, 2])
    torch.testing.assert_close(itc, torch.tensor([[0.9, 0.7, 0.2], [0.6, 0.9, 0.8], [0.7, 0.3, 0.1], [0.8, 0.5, 0.4]]))
    m = itm_hard_pair_metrics(torch.zeros(4, 3), itc)
    assert m["itc_hard_pair_acc"] == pytest.approx(100 * 6 / 8)
    with pytest.raises(ValueError):
        itm_hard_pair_metrics(torch.zeros(4, 3), itc[:, :2])
