"""Synthetic GLUE-style text classification corpora in the vocabulary of the synthetic video corpora.

* SST-2's format (``sentence``, ``label`` 0/1), in ``<out>/sst2/``: a caption ("a small red circle moving left
  quickly"), label 1 when its colour is warm (red, yellow), else 0; half each. The tiny config trains on it.
* RTE's format (``index``, ``sentence1``, ``sentence2``, ``label``), in ``<out>/rte/``: ``sentence1`` describes
  a shape ("a big red circle"), ``sentence2`` claims one attribute ("the shape is blue", "it is a circle");
  ``entailment`` when the claim holds, else ``not_entailment``, half each. Only the pair decides the label, so
  accuracy above 50 % means the model compared the two (slower to learn: 71 % after 1,000 tiny steps).

    python -m pipelines.synthetic_glue --out corpus/glue --train 2000 --dev 200
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from pipelines.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

log = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}
CLAIMS = {"colour": "the shape is {}", "shape": "it is a {}", "size": "it is {}"}
LABELS = ("entailment", "not_entailment")
WARM = ("red", "yellow")


def sentence_examples(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (caption, 1 if its colour is warm else 0), labels balanced, deterministic in ``seed``."""
    rng = random.Random(seed)
    cool = [c for c in COLOURS if c not in WARM]
    out = []
    for i in range(n):
        colour = rng.choice(WARM if i % 2 == 0 else cool)
        out.append((f"a {rng.choice(list(SIZES))} {colour} {rng.choice(SHAPES)} moving {rng.choice(list(DIRECTIONS))} "
                    f"{rng.choice(list(SPEEDS))}", int(colour in WARM)))
    rng.shuffle(out)
    return out


def _write_tsv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines("\t".join(map(str, row)) + "\n" for row in [header, *rows])
    log.info("wrote %d synthetic examples to %s", len(rows), path)
    return path


def write_sentence_tsv(path: Path, n: int, seed: int) -> Path:
    """Write ``n`` examples as an SST-2-style tsv (header ``sentence label``)."""
    return _write_tsv(path, ("sentence", "label"), sentence_examples(n, seed))


def pair_examples(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (sentence1, sentence2, label) triples, labels balanced, deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = {k: rng.choice(v) for k, v in ATTRIBUTES.items()}
        kind = rng.choice(sorted(ATTRIBUTES))
        entails = i % 2 == 0
        value = scene[kind] if entails else rng.choice([v for v in ATTRIBUTES[kind] if v != scene[kind]])
        out.append((f"a {scene['size']} {scene['colour']} {scene['shape']}", CLAIMS[kind].format(value),
                    LABELS[0] if entails else LABELS[1]))
    rng.shuffle(out)
    return out


def write_pair_tsv(path: Path, n: int, seed: int) -> Path:
    """Write ``n`` examples as an RTE-style tsv (header ``index sentence1 sentence2 label``)."""
    return _write_tsv(path, ("index", "sentence1", "sentence2", "label"),
                      [(i, *row) for i, row in enumerate(pair_examples(n, seed))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.synthetic_glue", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (writes {sst2,rte}/{train,dev}.tsv)")
    p.add_argument("--train", type=int, default=2000, help="train examples")
    p.add_argument("--dev", type=int, default=200, help="dev examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for split, n, seed in (("train", args.train, args.seed), ("dev", args.dev, args.seed + 1)):
        write_sentence_tsv(args.out / "sst2" / f"{split}.tsv", n, seed)
        write_pair_tsv(args.out / "rte" / f"{split}.tsv", n, seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
