"""How we call pycocoevalcap: our tokenisation, then its scorers, give the figures its scorers give on the
tokenised text; exact and disjoint candidates score as CIDEr-D / BLEU define; bad input fails clearly."""

from __future__ import annotations

import pytest

from mplug2.eval.caption_metrics import coco_caption_scores, tokenize

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
def test_equal_to_pycocoevalcap_on_tokenised_text(name):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = REF_SETS[name]
    ours = coco_caption_scores(refs, cands)
    r = {k: [tokenize(x) for x in v] for k, v in refs.items()}
    res = {k: [tokenize(v)] for k, v in cands.items()}
    b, _ = Bleu(4).compute_score(r, res, verbose=0)
    expected = {**{f"Bleu_{i + 1}": s for i, s in enumerate(b)}, "ROUGE_L": Rouge().compute_score(r, res)[0],
                "CIDEr": Cider().compute_score(r, res)[0]}
    assert set(ours) == set(expected)
    for k in ours:
        assert ours[k] == pytest.approx(expected[k], abs=1e-12), k


def test_punctuation_and_case_do_not_change_scores():
    refs, cands = REF_SETS["multi_refs"]
    shouted = {k: v.upper() + "!!" for k, v in cands.items()}
    assert coco_caption_scores(refs, shouted) == coco_caption_scores(refs, cands)


def test_perfect_and_disjoint_candidates():
    refs = {1: ["a man rides a horse on the beach"], 2: ["two kids play football in a park"],
            3: ["a woman sings into a microphone"]}
    s = coco_caption_scores(refs, {k: v[0] for k, v in refs.items()})
    assert s["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and s["ROUGE_L"] == pytest.approx(1.0)
    assert s["CIDEr"] == pytest.approx(10.0, rel=1e-9)  # CIDEr-D of an exact match is 10 (x10 scaling)
    disjoint = coco_caption_scores(refs, {1: "zebra", 2: "zebra", 3: "zebra"})
    assert disjoint["CIDEr"] == 0.0 and disjoint["ROUGE_L"] == 0.0 and disjoint["Bleu_1"] < 1e-6


def test_tokenize_rules():
    assert tokenize("  A Man's   well-known guitar/bass, played!  ") == "a mans well known guitar bass played"
    assert tokenize("...") == ""


def test_mismatched_keys_fail_clearly():
    with pytest.raises(ValueError, match="same keys"):
        coco_caption_scores({1: ["a"]}, {2: "a"})
    with pytest.raises(ValueError, match="non-empty list"):
        coco_caption_scores({1: []}, {1: "a"})
