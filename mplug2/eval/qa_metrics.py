"""Question-answering accuracy: exact match (video QA, the release's metric) and VQA soft accuracy.

* :func:`exact_match_accuracy`: a prediction is right when, after :func:`normalize_answer` (strip, lower-case,
  collapse whitespace), it equals the gold answer or any of several accepted answers.
* :func:`vqa_accuracy`: the VQA v2 metric. With 10 human answers, a prediction scores
  ``mean over the 10 leave-one-out subsets of min(1, #matches in the subset / 3)``; answers are normalised
  with the official rules for punctuation, number words and articles (:func:`normalize_vqa_answer`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match_accuracy", "normalize_vqa_answer", "vqa_score", "vqa_accuracy"]

_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower-case, strip, collapse whitespace (the release compares raw strings; this only removes noise)."""
    return _WS.sub(" ", text.strip().lower())


def exact_match_accuracy(preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> float:
    """Percentage of predictions equal to their gold answer (or to one of a list of accepted answers)."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")
    if not preds:
        return float("nan")
    hits = 0
    for p, g in zip(preds, golds):
        accepted = {normalize_answer(g)} if isinstance(g, str) else {normalize_answer(x) for x in g}
        hits += normalize_answer(p) in accepted
    return 100.0 * hits / len(preds)


# Official VQA evaluation rules (vqaEval.py): punctuation, number words, articles.
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "hasnt": "hasn't",
                 "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                 "whats": "what's", "whos": "who's", "hes": "he's", "shes": "she's", "lets": "let's"}


def normalize_vqa_answer(text: str) -> str:
    """VQA-eval normalisation: punctuation, number words -> digits, articles dropped, common contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of one prediction against the human answers (usually 10)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    p = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(p == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == p for g in others) / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(preds: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA soft accuracy in percent."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answer lists")
    if not preds:
        return float("nan")
    return 100.0 * sum(vqa_score(p, a) for p, a in zip(preds, answers)) / len(preds)
