"""A synthetic GLUE-style sentence-pair corpus (RTE's format: ``index``, ``sentence1``, ``sentence2``,
``label``) for text classification, in the vocabulary of the synthetic video corpora.

``sentence1`` describes a scene ("a big red circle"); ``sentence2`` claims one attribute of it ("the shape is
blue", "it is a circle", "it is small"); the label is ``entailment`` when the claim matches the description,
``not_entailment`` otherwise (half each). Only the pair decides the label: each sentence alone carries no
signal, so accuracy above 50 % means the model compared the two.

    python -m pipelines.synthetic_glue --out corpus/ --train 2000 --dev 200
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from pipelines.synthetic import COLOURS, SHAPES, SIZES

log = logging.getLogger(__name__)

ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}
CLAIMS = {"colour": "the shape is {}", "shape": "it is a {}", "size": "it is {}"}
LABELS = ("entailment", "not_entailment")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tsentence1\tsentence2\tlabel\n")
        for i, (a, b, label) in enumerate(pair_examples(n, seed)):
            f.write(f"{i}\t{a}\t{b}\t{label}\n")
    log.info("wrote %d synthetic sentence pairs to %s", n, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.synthetic_glue", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (writes train.tsv and dev.tsv)")
    p.add_argument("--train", type=int, default=2000, help="train examples")
    p.add_argument("--dev", type=int, default=200, help="dev examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    write_pair_tsv(args.out / "train.tsv", args.train, args.seed)
    write_pair_tsv(args.out / "dev.tsv", args.dev, args.seed + 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
