"""Prefix-LM splitting at word boundaries; prompt and pad tokens carry no loss; reductions agree."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.mlm import IGNORE_INDEX
from mplug2.objectives.prefix_lm import PrefixSplitter, pack_targets
from mplug2.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_split_points_are_uniform_word_boundaries(tok):
    sp = PrefixSplitter.from_tokenizer(tok)
    # "xyz" is one word of three pieces (x ##y ##z) in the tiny vocab
    enc = tok(["a xyz dog cat"], max_length=12)
    tokens = sp.content(enc["input_ids"][0], enc["attention_mask"][0])
    assert len(tokens) == 6 and sp.word_starts(tokens).tolist() == [0, 1, 4, 5]
    g = torch.Generator().manual_seed(0)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(600):
        s = sp.split(enc["input_ids"], enc["attention_mask"], generator=g)
        k = int(s.split_words[0])
        counts[k] += 1
        prefix = sp.content(s.prefix_ids[0], s.prefix_mask[0])
        target = s.target_ids[0][s.target_mask[0].bool()][1:-1]
        assert torch.equal(torch.cat([prefix, target]), tokens)   # nothing lost, nothing cut inside a word
        assert len(prefix) >= 1 and len(target) >= 1
        assert not tok.convert_ids_to_tokens(int(target[0])).startswith("##")  # the cut is at a word start
    assert all(150 < c < 250 for c in counts.values()), counts  # uniform over the 3 boundaries


def test_one_word_caption_falls_back_to_empty_prefix(tok):
    sp = PrefixSplitter.from_tokenizer(tok)
    enc = tok(["dog"], max_length=6)
    s = sp.split(enc["input_ids"], enc["attention_mask"])
    assert s.prefix_ids[0, :2].tolist() == [tok.cls_token_id, tok.sep_token_id] and int(s.split_words[0]) == 0
    assert s.target_ids[0].tolist()[:3] == [tok.cls_token_id, tok.convert_tokens_to_ids("dog"), tok.sep_token_id]


def test_prompt_and_pad_carry_no_loss_and_reductions_agree(tok):
    torch.manual_seed(0)
    model = MPLUG2(MPLUG2Config.preset("tiny")).eval()
    prompt = torch.tensor(tok.encode("a video of"))
    targets = [torch.tensor(tok.encode("the dog")), torch.tensor(tok.encode("a man is playing"))]
    ids, mask, labels = pack_targets(targets, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, prompt)
    p = 1 + len(prompt)
    assert (labels[:, :p] == IGNORE_INDEX).all()                        # [CLS] + prompt
    assert (labels[mask == 0] == IGNORE_INDEX).all()                    # pads
    assert torch.equal(labels[0, p:p + 3], torch.tensor(tok.encode("the dog") + [tok.sep_token_id]))
    memory = torch.randn(2, 5, 32)
    mmask = torch.ones(2, 5, dtype=torch.long)
    out = model.decode(ids, mask, memory, mmask, labels=labels)
    # changing prompt or pad *labels* positions' logits cannot move the loss: perturb them via ignored labels
    n_tok = (labels[:, 1:] != IGNORE_INDEX).sum()
    seq = model.decode(ids, mask, memory, mmask, labels=labels, reduction="sequence_sum").loss
    torch.testing.assert_close(seq * ids.shape[0], out.loss * n_tok)  # mean-of-sums x B == token mean x tokens
    # a loss computed by hand over only the scored positions matches
    logits = out.logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(out.loss, ref)
    # replacing pad ids with other tokens (same mask) leaves the loss unchanged
    ids2 = ids.clone()
    ids2[mask == 0] = 50
    torch.testing.assert_close(model.decode(ids2, mask, memory, mmask, labels=labels).loss, out.loss)
