"""Caption and question cleaning as the mPLUG-2 release does it (``dataset/utils.py``).

Lower-case; drop ``,.'!?"()*#:;~``; map ``-`` and ``/`` to spaces; collapse whitespace; truncate by words.
Applied at load time (never in the shard writer) so the raw text stays available.
"""

from __future__ import annotations

import re

__all__ = ["pre_caption", "pre_question", "swap_left_right"]

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s+")
# "left"/"right" and their directional forms, as whole words: leftward(s), leftmost, left-hand, lefts.
_SIDES = re.compile(r"\b(left|right)(wards?|most|s)?\b", re.IGNORECASE)


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    text = _PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ")
    return _SPACES.sub(" ", text).strip()


def _truncate(text: str, max_words: int) -> str:
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption; the release also maps ``<person>`` (a placeholder in some corpora) to ``person``."""
    if not isinstance(caption, str):
        raise TypeError(f"expected a string caption, got {type(caption).__name__}")
    return _truncate(_clean(caption.replace("<person>", "person")), max_words)


def pre_question(question: str, max_words: int = 30) -> str:
    """Clean a question (same rules as captions, no placeholder mapping)."""
    return _truncate(_clean(question), max_words)


def swap_left_right(text: str) -> str:
    """Swap the words *left* and *right* (and -ward, -wards, -most, -s forms), keeping their case.

    A horizontally flipped clip is described by the mirrored caption: without this, flip augmentation teaches
    a model that "moving left" and "moving right" look alike (MDETR and GLIP do the same for grounding).
    The non-spatial senses of "right" (a right, all right) are swapped too, as in those implementations;
    set ``TransformConfig.hflip`` off for corpora where that matters.
    """
    def repl(m: re.Match) -> str:
        word, suffix = m.group(1), m.group(2) or ""
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + suffix

    return _SIDES.sub(repl, text)
