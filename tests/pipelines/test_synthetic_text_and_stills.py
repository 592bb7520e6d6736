"""The synthetic still images say what is visible and rarely repeat a caption (repeats are false negatives
for contrastive learning), and the synthetic sentence pairs can only be labelled by comparing the two."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from PIL import Image

from mplug2.data.text import swap_left_right
from pipelines.synthetic import CORNERS, make_image_corpus
from pipelines.synthetic_glue import LABELS, pair_examples


def test_still_captions_name_the_corner_the_shape_is_in(tmp_path):
    rows = [json.loads(line) for line in open(make_image_corpus(tmp_path, 48, seed=3, size=48))]
    assert len({r["caption"] for r in rows}) == 48                 # 144 combinations cycled: no repeat here
    for r in rows[:12]:
        assert r["caption"] == f"a {r['size']} {r['colour']} {r['shape']} in the {r['corner']}"
        px = np.asarray(Image.open(r["url"]), dtype=np.float32)
        bright = np.argwhere(px.max(axis=2) > 100)                  # the shape (the background stays below 60)
        cy, cx = bright.mean(axis=0) / 48
        fx, fy = CORNERS[r["corner"]]
        assert abs(cx - fx) < 0.1 and abs(cy - fy) < 0.1, r
    flipped = swap_left_right("a small red circle in the top left")
    assert flipped == "a small red circle in the top right"
    distinct = [json.loads(line)["caption"] for line in
                open(make_image_corpus(tmp_path, 144, seed=4, size=32, split="eval", distinct=True))]
    assert len(set(distinct)) == 144


def test_sentence_pairs_are_balanced_and_decided_only_by_the_pair():
    pairs = pair_examples(600, seed=0)
    assert Counter(label for *_, label in pairs) == {LABELS[0]: 300, LABELS[1]: 300}
    for a, b, label in pairs:
        assert (b.split()[-1] in a.split()) == (label == LABELS[0]), (a, b, label)
    # neither sentence alone predicts the label: every first sentence and claim comes with both labels
    by_claim = Counter((b, label) for _, b, label in pairs)
    assert all(by_claim[(b, LABELS[0])] and by_claim[(b, LABELS[1])] for b, _ in by_claim)


def test_sentences_are_labelled_by_their_colour_and_balanced():
    from pipelines.synthetic_glue import WARM, sentence_examples

    rows = sentence_examples(400, seed=1)
    assert Counter(label for _, label in rows) == {0: 200, 1: 200}
    assert all(label == int(text.split()[2] in WARM) for text, label in rows)


def test_a_synthetic_clip_encodes_to_the_same_bytes_every_time(tmp_path):
    """The learning tests and the demo train on clips made per run: if the same frames gave other bytes (x264's
    macroblock-tree did, now and then, depending on what the process had encoded before), their figures moved
    between runs of the same code. Encodes of the same clips, interleaved with other clips, give one file each."""
    import hashlib

    from pipelines.synthetic import clip_specs, render_frames, write_mp4

    specs = clip_specs(12, seed=0)
    frames = {i: render_frames(specs[i], num_frames=16, size=64) for i in range(12)}
    digests: dict[int, set[str]] = {i: set() for i in frames}
    for rep in range(8):
        for i, clip in frames.items():
            path = tmp_path / f"{rep}_{i}.mp4"
            write_mp4(path, clip)
            digests[i].add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert {i: len(d) for i, d in digests.items() if len(d) > 1} == {}
