"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D, equal to pycocoevalcap on the same tokenised text.

The release scores captions with ``language_evaluation`` (CocoEvaluator = pycocoevalcap behind the Java PTB
tokenizer). We avoid Java: :func:`tokenize` lower-cases and strips punctuation (model-spec §6 ``pre_caption``
rules), and our scorers reproduce pycocoevalcap's numerics exactly, quirks included:

* BLEU: corpus-level ``closest`` reference length (ties -> the shorter), the ``1e-15``/``1e-9`` smoothing
  constants, brevity penalty ``exp(1 − r/c)`` when c < r; per-sentence scores use the same constants.
* ROUGE-L: LCS precision/recall against each reference, max over references, F with β = 1.2.
* CIDEr-D: n = 1..4, document frequency over the evaluated set's references, ``idf = log(N) − log(max(1, df))``,
  clipped tf-idf cosine, Gaussian length penalty σ = 6 where "length" is pycocoevalcap's count of *bigrams*
  (``len − 1``), mean over n and references, ×10.

:func:`coco_caption_scores` runs pycocoevalcap itself (Bleu, Rouge, Cider; METEOR and SPICE need Java),
silencing its prints, for reports that must quote the reference implementation.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["tokenize", "bleu", "rouge_l", "cider_d", "caption_scores", "coco_caption_scores"]

_DROP = re.compile(r"[^\w\s]")
_SPACE_LIKE = re.compile(r"[-/]")
_WS = re.compile(r"\s+")

Refs = Mapping[Hashable, Sequence[str]]
Cands = Mapping[Hashable, str]


def tokenize(text: str) -> str:
    """Lower-case, map ``-``/``/`` to spaces, drop other punctuation, collapse whitespace."""
    text = _SPACE_LIKE.sub(" ", text.lower())
    text = _DROP.sub("", text)
    return _WS.sub(" ", text).strip()


def _check(refs: Refs, cands: Cands) -> list[Hashable]:
    if set(refs) != set(cands):
        missing = set(refs) ^ set(cands)
        raise ValueError(f"references and candidates must have the same keys; {len(missing)} differ, "
                         f"e.g. {sorted(map(str, missing))[:3]}")
    for k, r in refs.items():
        if isinstance(r, str) or len(r) == 0:
            raise ValueError(f"references for {k!r} must be a non-empty list of strings")
    return list(refs.keys())


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


# ----------------------------------------------------------------------------------------------- BLEU
def bleu(refs: Refs, cands: Cands, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-candidate BLEU lists (pycocoevalcap ``Bleu(n).compute_score``)."""
    keys = _check(refs, cands)
    small, tiny = 1e-9, 1e-15
    tot_guess, tot_correct = [0] * n, [0] * n
    tot_test, tot_ref = 0, 0
    per: list[list[float]] = [[] for _ in range(n)]
    for key in keys:
        test = cands[key].split()
        ref_lens, max_counts = [], Counter()
        for r in refs[key]:
            rw = r.split()
            ref_lens.append(len(rw))
            for g, c in _ngram_counts(rw, n).items():
                max_counts[g] = max(max_counts[g], c)
        tl = len(test)
        rl = min((abs(l - tl), l) for l in ref_lens)[1]
        guess = [max(0, tl - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in _ngram_counts(test, n).items():
            correct[len(g) - 1] += min(max_counts.get(g, 0), c)
        tot_test += tl
        tot_ref += rl
        score = 1.0
        for k in range(n):
            tot_guess[k] += guess[k]
            tot_correct[k] += correct[k]
            score *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per[k].append(score ** (1.0 / (k + 1)))
        ratio = (tl + tiny) / (rl + small)
        if ratio < 1:
            for k in range(n):
                per[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= float(tot_correct[k] + tiny) / (tot_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (tot_test + tiny) / (tot_ref + small)
    if ratio < 1:
        corpus = [s * math.exp(1 - 1 / ratio) for s in corpus]
    return corpus, per


# -------------------------------------------------------------------------------------------- ROUGE-L
def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(refs: Refs, cands: Cands, beta: float = 1.2) -> tuple[float, list[float]]:
    """Mean ROUGE-L F-score and per-candidate scores (pycocoevalcap ``Rouge``)."""
    keys = _check(refs, cands)
    scores = []
    for key in keys:
        # pycocoevalcap splits on " ": an empty string is one empty token (length 1, matches nothing).
        c = cands[key].split(" ")
        prec, rec = [], []
        for r in refs[key]:
            rt = r.split(" ")
            lcs = _lcs(rt, c)
            prec.append(lcs / float(len(c)))
            rec.append(lcs / float(len(rt)))
        p, r_ = max(prec), max(rec)
        scores.append(((1 + beta ** 2) * p * r_) / float(r_ + beta ** 2 * p) if p != 0 and r_ != 0 else 0.0)
    return (sum(scores) / len(scores) if scores else float("nan")), scores


# ------------------------------------------------------------------------------------------- CIDEr-D
def cider_d(refs: Refs, cands: Cands, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and per-candidate scores (pycocoevalcap ``Cider``: idf from this set's references)."""
    keys = _check(refs, cands)
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs[k]] for k in keys]
    test_counts = [_ngram_counts(cands[k].split(), n) for k in keys]
    df: Counter = Counter()
    for rc in ref_counts:
        for g in {g for c in rc for g in c}:
            df[g] += 1
    log_n = math.log(float(len(keys)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df.get(g, 0.0))))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for tc, rcs in zip(test_counts, ref_counts):
        vh, nh, lh = vec(tc)
        acc = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-(float(lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                acc[k] += val * penalty
        scores.append(sum(acc) / n / len(rcs) * 10.0)
    return sum(scores) / len(scores), scores


# ------------------------------------------------------------------------------------------- reports
def _tokenized(refs: Mapping[Hashable, Sequence[str] | str], cands: Cands) -> tuple[dict, dict]:
    r = {k: [tokenize(x) for x in ([v] if isinstance(v, str) else v)] for k, v in refs.items()}
    c = {k: tokenize(v) for k, v in cands.items()}
    return r, c


def caption_scores(refs: Mapping[Hashable, Sequence[str] | str], cands: Cands) -> dict[str, float]:
    """Our BLEU-1..4, ROUGE-L and CIDEr after :func:`tokenize`, keyed like pycocoevalcap (``Bleu_4``, ...)."""
    r, c = _tokenized(refs, cands)
    b, _ = bleu(r, c)
    out = {f"Bleu_{i + 1}": s for i, s in enumerate(b)}
    out["ROUGE_L"] = rouge_l(r, c)[0]
    out["CIDEr"] = cider_d(r, c)[0]
    return out


def coco_caption_scores(refs: Mapping[Hashable, Sequence[str] | str], cands: Cands) -> dict[str, float]:
    """The same scores from pycocoevalcap's own scorers (prints silenced), on :func:`tokenize`-d text."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    r, c = _tokenized(refs, cands)
    _check(r, c)
    res = {k: [v] for k, v in c.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        b, _ = Bleu(4).compute_score(r, res, verbose=0)
        rl, _ = Rouge().compute_score(r, res)
        ci, _ = Cider().compute_score(r, res)
    out = {f"Bleu_{i + 1}": float(s) for i, s in enumerate(b)}
    out["ROUGE_L"] = float(rl)
    out["CIDEr"] = float(ci)
    return out
