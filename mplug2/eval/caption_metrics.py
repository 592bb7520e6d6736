"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D from pycocoevalcap's own scorers.

The release scores captions with ``language_evaluation`` (CocoEvaluator = pycocoevalcap behind the Java PTB
tokenizer). We avoid Java: :func:`tokenize` lower-cases and strips punctuation (model-spec §6 ``pre_caption``
rules), then pycocoevalcap's Bleu, Rouge and Cider score the tokenised text (METEOR and SPICE need Java).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["tokenize", "coco_caption_scores"]

_DROP = re.compile(r"[^\w\s]")
_SPACE_LIKE = re.compile(r"[-/]")
_WS = re.compile(r"\s+")

Refs = Mapping[Hashable, Sequence[str] | str]
Cands = Mapping[Hashable, str]


def tokenize(text: str) -> str:
    """Lower-case, map ``-``/``/`` to spaces, drop other punctuation, collapse whitespace."""
    text = _SPACE_LIKE.sub(" ", text.lower())
    text = _DROP.sub("", text)
    return _WS.sub(" ", text).strip()


def _tokenized(refs: Refs, cands: Cands) -> tuple[dict, dict]:
    if set(refs) != set(cands):
        differ = set(refs) ^ set(cands)
        raise ValueError(f"references and candidates must have the same keys; {len(differ)} differ, "
                         f"e.g. {sorted(map(str, differ))[:3]}")
    r = {k: [tokenize(x) for x in ([v] if isinstance(v, str) else v)] for k, v in refs.items()}
    for k, v in r.items():
        if not v:
            raise ValueError(f"references for {k!r} must be a non-empty list of strings")
    return r, {k: tokenize(v) for k, v in cands.items()}


def coco_caption_scores(refs: Refs, cands: Cands) -> dict[str, float]:
    """``Bleu_1..4``, ``ROUGE_L``, ``CIDEr`` (CIDEr-D, ×10) of ``cands`` against ``refs`` (a string or a list of
    references per key), both :func:`tokenize`-d first; pycocoevalcap's prints are silenced."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    r, c = _tokenized(refs, cands)
    res = {k: [v] for k, v in c.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        b, _ = Bleu(4).compute_score(r, res, verbose=0)
        rl, _ = Rouge().compute_score(r, res)
        ci, _ = Cider().compute_score(r, res)
    out = {f"Bleu_{i + 1}": float(s) for i, s in enumerate(b)}
    out["ROUGE_L"] = float(rl)
    out["CIDEr"] = float(ci)
    return out
