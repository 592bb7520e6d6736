"""Our BLEU / ROUGE-L / CIDEr-D must equal pycocoevalcap's scorers on the same tokenised text."""

from __future__ import annotations

import random

import pytest

from mplug2.eval.caption_metrics import bleu, caption_scores, cider_d, coco_caption_scores, rouge_l, tokenize

REF_SETS = {
    "multi_refs": (
        {"v1": ["A man is playing a guitar.", "Someone plays the guitar!", "a person playing guitar on stage"],
         "v2": ["A dog runs across the grass.", "the dog is running", "A brown dog running in a field."],
         "v3": ["Two women are cooking in a kitchen.", "women cook food"]},
        {"v1": "a man playing a guitar", "v2": "a dog is running on the grass", "v3": "a woman is cooking"}),
    "repeated_words": (
        {0: ["the the the cat sat on the mat", "a cat on a mat the cat"], 1: ["dog dog dog", "a dog and a dog"],
         2: ["red red ball ball", "the ball is red"]},
        {0: "the the the the the", 1: "dog dog dog dog", 2: "ball red ball red"}),
    "empty_ish": (
        {"a": ["a man talks", "someone is talking"], "b": ["a car drives fast", "the car is on the road"],
         "c": ["cooking show", "a chef prepares food in a kitchen"]},
        {"a": "", "b": "car", "c": "a"}),
}


@pytest.mark.parametrize("name", sorted(REF_SETS))
def test_equal_to_pycocoevalcap(name):
    refs, cands = REF_SETS[name]
    ours, ref = caption_scores(refs, cands), coco_caption_scores(refs, cands)
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"} == set(ref)
    for k in ours:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k


def test_per_sentence_scores_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    rng = random.Random(3)
    words = "a the man dog cat runs on grass red ball playing with".split()
    for _ in range(15):
        refs = {i: [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
                for i in range(rng.randint(2, 9))}
        cands = {i: " ".join(rng.choices(words, k=rng.randint(0, 10))) for i in refs}
        res = {k: [v] for k, v in cands.items()}
        b_ref, b_per_ref = Bleu(4).compute_score(refs, res, verbose=0)
        b, b_per = bleu(refs, cands)
        assert b == pytest.approx(b_ref, abs=1e-9)
        for k in range(4):
            assert b_per[k] == pytest.approx(b_per_ref[k], abs=1e-9)
        r_ref, r_per_ref = Rouge().compute_score(refs, res)
        r, r_per = rouge_l(refs, cands)
        assert r == pytest.approx(r_ref, abs=1e-9) and r_per == pytest.approx(list(r_per_ref), abs=1e-9)
        c_ref, c_per_ref = Cider().compute_score(refs, res)
        c, c_per = cider_d(refs, cands)
        assert c == pytest.approx(c_ref, abs=1e-9) and c_per == pytest.approx(list(c_per_ref), abs=1e-9)


def test_perfect_and_disjoint_candidates():
    refs = {1: ["a man rides a horse on the beach"], 2: ["two kids play football in a park"],
            3: ["a woman sings into a microphone"]}
    perfect = {k: v[0] for k, v in refs.items()}
    s = caption_scores(refs, perfect)
    assert s["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and s["ROUGE_L"] == pytest.approx(1.0)
    assert s["CIDEr"] == pytest.approx(10.0, rel=1e-9)  # CIDEr-D of an exact match is 10 (x10 scaling)
    disjoint = caption_scores(refs, {1: "zebra", 2: "zebra", 3: "zebra"})
    assert disjoint["CIDEr"] == 0.0 and disjoint["ROUGE_L"] == 0.0 and disjoint["Bleu_1"] < 1e-6


def test_tokenize_rules():
    assert tokenize("  A Man's   well-known guitar/bass, played!  ") == "a mans well known guitar bass played"
    assert tokenize("...") == ""


def test_mismatched_keys_fail_clearly():
    with pytest.raises(ValueError, match="same keys"):
        caption_scores({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({1: []}, {1: "a"})
