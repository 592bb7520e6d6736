"""Caption and question cleaning as the mPLUG-2 release does it (``dataset/utils.py``).

Lower-case; drop ``,.'!?"()*#:;~``; map ``-`` and ``/`` to spaces; collapse whitespace; truncate by words.
Applied at load time (never in the shard writer) so the raw text stays available.
"""

from __future__ import annotations

import re

__all__ = ["pre_caption", "pre_question"]

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s+")


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
