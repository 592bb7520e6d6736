"""EMA twins, ITM hard negatives and MLM masking statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mplug2.objectives.itm import ITMHead, itm_loss, reversed_clip_logits, sample_hard_negatives
from mplug2.objectives.mlm import IGNORE_INDEX, MaskingConfig, mask_tokens, mlm_loss
from mplug2.objectives.momentum import MomentumPairs, make_momentum_twin, momentum_update


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4))
    return net


def test_tied_weights_stay_tied_in_the_twin():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10)
    head.weight = emb.weight  # MLM/LM heads tie the output projection to the word embeddings
    online = nn.ModuleDict({"emb": emb, "head": head})
    twin = make_momentum_twin(online)
    assert twin["head"].weight is twin["emb"].weight
    with torch.no_grad():
        emb.weight.add_(1.0)
    momentum_update([(online, twin)], 0.0)
    assert torch.equal(twin["head"].weight, emb.weight)


def test_ema_m0_copies_m1_freezes_and_intermediate_lerps():
    online = _net()
    twin = make_momentum_twin(online)
    assert all(not p.requires_grad for p in twin.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in twin.parameters()]
    momentum_update([(online, twin)], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), before))
    momentum_update([(online, twin)], 0.75)
    for t, b, o in zip(twin.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * o)
    momentum_update([(online, twin)], 0.0)
    assert all(torch.equal(t, o) for t, o in zip(twin.parameters(), online.parameters()))
    with pytest.raises(ValueError):
        momentum_update([(online, twin)], 1.5)


def test_momentum_model_never_gets_gradients():
    online = _net()
    pairs = MomentumPairs({"net": online}, momentum=0.9)
    x = torch.randn(3, 4)
    (online(x).sum() + pairs["net"](x).sum()).backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in pairs["net"].parameters())
    # the twin is not registered as part of the online model, and its state is in the pairs' state_dict
    assert all(k.startswith("twins.net.") for k in pairs.state_dict())
    w_before = pairs["net"][0].weight.clone()
    pairs.update()
    torch.testing.assert_close(pairs["net"][0].weight, w_before)  # online == twin still (no step happened)


def test_twin_mismatch_is_an_error():
    with pytest.raises(ValueError, match="mirror"):
        momentum_update([(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))], 0.5)


def test_itm_negatives_never_positive_or_same_id():
    g = torch.Generator().manual_seed(0)
    b = 6
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    for _ in range(200):
        sim = torch.randn(b, b, generator=g) * 10
        neg_t, neg_v = sample_hard_negatives(sim, sim.t().contiguous(), ids, generator=g)
        assert (ids[neg_t] != ids).all() and (ids[neg_v] != ids).all()
    neg_t, neg_v = sample_hard_negatives(torch.randn(b, b), torch.randn(b, b))
    assert (neg_t != torch.arange(b)).all() and (neg_v != torch.arange(b)).all()


def test_itm_prefers_hard_negatives():
    sim = torch.full((3, 3), -5.0)
    sim[0, 2] = 5.0  # text 2 is by far the hardest negative for image 0
    counts = torch.zeros(3)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        neg_t, _ = sample_hard_negatives(sim, sim, generator=g)
        counts[neg_t[0]] += 1
    assert counts[2] > 190 and counts[0] == 0


def test_itm_random_mix_blends_hard_and_uniform_negatives():
    # Image 0 has one overwhelmingly hard text (2) among valid candidates 2, 3, 4 (1 shares its id).
    # mix 0: always the hard one; mix 1: uniform over the valid ones; 0.5: half hard + half uniform = 2/3, 1/6, 1/6.
    b, n = 5, 400
    ids = torch.tensor([0, 0, 1, 2, 3])
    sim = torch.full((b, b), -5.0)
    sim[0, 2] = 30.0
    g = torch.Generator().manual_seed(0)
    for mix, expect in ((0.0, (1.0, 0.0, 0.0)), (0.5, (2 / 3, 1 / 6, 1 / 6)), (1.0, (1 / 3, 1 / 3, 1 / 3))):
        counts = torch.zeros(b)
        for _ in range(n):
            neg_t, neg_v = sample_hard_negatives(sim, sim, ids, generator=g, random_mix=mix)
            counts[neg_t[0]] += 1
            assert (ids[neg_t] != ids).all() and (ids[neg_v] != ids).all()
        assert counts[:2].sum() == 0, (mix, counts)                  # never the positive nor a same-id item
        torch.testing.assert_close(counts[2:] / n, torch.tensor(expect), atol=0.07, rtol=0)  # 3.5 sd
    with pytest.raises(ValueError, match="random_mix"):
        sample_hard_negatives(sim, sim, random_mix=1.5)


def test_itm_no_valid_negative_raises():
    with pytest.raises(ValueError, match="no valid negative"):
        sample_hard_negatives(torch.randn(3, 3), torch.randn(3, 3), ids=torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="no valid negative"):
        sample_hard_negatives(torch.randn(1, 1), torch.randn(1, 1))


def test_itm_loss_layout():
    b, lv, lt, d = 4, 5, 3, 8
    vis, text = torch.randn(b, lv, d), torch.randn(b, lt, d)
    calls = []

    def fuse(t, tm, v, vm):
        calls.append((t, v))
        return v, t + v[:, :1]

    out = itm_loss(fuse, ITMHead(d), vis, torch.ones(b, lv, dtype=torch.long), text,
                   torch.ones(b, lt, dtype=torch.long), torch.randn(b, b), torch.randn(b, b))
    assert out.labels.tolist() == [1] * b + [0] * 2 * b
    assert out.logits.shape == (3 * b, 2) and out.loss.ndim == 0
    t_all, v_all = calls[0]
    assert torch.equal(v_all[:b], vis) and torch.equal(t_all[:b], text)            # positives
    assert torch.equal(v_all[b:2 * b], vis[out.neg_image_for_text]) and torch.equal(t_all[b:2 * b], text)
    assert torch.equal(v_all[2 * b:], vis) and torch.equal(t_all[2 * b:], text[out.neg_text_for_image])


PAD, CLS, SEP, MASK, V = 0, 2, 3, 4, 100


def test_mlm_statistics_and_specials():
    cfg = MaskingConfig(mask_token_id=MASK, vocab_size=V, special_ids=(PAD, CLS, SEP, MASK))
    g = torch.Generator().manual_seed(0)
    b, length = 64, 20
    ids = torch.randint(10, V, (b, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(5, length, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[torch.arange(b), lengths - 1] = SEP
    ids[mask == 0] = PAD
    maskable = (mask == 1) & (ids != CLS) & (ids != SEP)
    n_sel = n_mask = n_rand = n_keep = total = 0
    for _ in range(50):
        masked, labels = mask_tokens(ids, mask, cfg, generator=g)
        sel = labels != IGNORE_INDEX
        assert not (sel & ~maskable).any(), "a special or pad position was selected"
        assert torch.equal(labels[sel], ids[sel])
        assert torch.equal(masked[~sel], ids[~sel])  # unselected tokens untouched
        total += int(maskable.sum())
        n_sel += int(sel.sum())
        n_mask += int((masked[sel] == MASK).sum())
        same = masked[sel] == ids[sel]
        n_keep += int(same.sum())
        n_rand += int(((masked[sel] != MASK) & ~same).sum())
        assert not torch.isin(masked[sel & (masked != ids)], torch.tensor([PAD, CLS, SEP])).any()
    assert n_sel / total == pytest.approx(0.15, abs=0.01)
    assert n_mask / n_sel == pytest.approx(0.8, abs=0.02)
    # random replacements can hit the original id (1/96), counted as "kept"
    assert n_rand / n_sel == pytest.approx(0.1, abs=0.02)
    assert n_keep / n_sel == pytest.approx(0.1, abs=0.02)


def test_mlm_loss_distillation_and_empty_selection():
    logits = torch.randn(2, 5, V, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    zero = mlm_loss(logits, labels)
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None
    labels[0, 1], labels[1, 3] = 7, 9
    hard = mlm_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[[0, 1], [1, 3]], torch.tensor([7, 9]))
    assert hard.item() == pytest.approx(ref.item(), rel=1e-6)
    # soft targets equal to the model's own distribution: loss = (1-a)*CE + a*entropy
    mixed = mlm_loss(logits, labels, soft_logits=logits.detach(), alpha=0.4)
    p = logits[[0, 1], [1, 3]].softmax(-1)
    ent = -(p * p.log()).sum(-1).mean()
    assert mixed.item() == pytest.approx((0.6 * ref + 0.4 * ent).item(), rel=1e-5)


def test_itm_loss_survives_rows_without_a_negative():
    # Damaged samples filled with repeats of the one readable sample: no row has a valid negative. The loss is
    # finite and reaches every ITM parameter (DDP needs them all), and only positives count; with one row
    # sharing its caption with nobody else, that row's negatives count again.
    torch.manual_seed(0)
    d, b = 8, 4
    head = ITMHead(d)

    def fuse(text, tmask, vis, vmask):
        return vis, text + vis.mean(dim=1, keepdim=True)

    vis, text = torch.randn(b, 3, d, requires_grad=True), torch.randn(b, 5, d)
    vm, tm = torch.ones(b, 3), torch.ones(b, 5)
    sim = torch.randn(b, b)
    same = torch.tensor([7, 7, 7, 7])
    out = itm_loss(fuse, head, vis, vm, text, tm, sim, sim.t().contiguous(), ids=same, text_ids=same)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in head.parameters()) and vis.grad is not None
    pos_only = torch.nn.functional.cross_entropy(out.logits[:b], out.labels[:b])
    assert torch.allclose(out.loss, pos_only)
    mixed = torch.tensor([7, 7, 7, 8])
    out = itm_loss(fuse, head, vis, vm, text, tm, sim, sim.t().contiguous(), ids=mixed, text_ids=mixed)
    assert (out.neg_text_for_image[:3] == 3).all() and (out.neg_text_for_image[3] != 3)


def test_reversed_clips_are_each_clip_played_backwards_with_its_own_caption():
    b, t, d = 4, 3, 8
    pixels = torch.randn(b, 3, t, 4, 4)
    text, tmask = torch.randn(b, 5, d), torch.ones(b, 5, dtype=torch.long)
    seen, proj = {}, torch.randn(3, d)

    def encode_vision(px):
        seen["pixels"] = px
        return px.flatten(2).transpose(1, 2) @ proj, torch.ones(px.shape[0], px.shape[2] * 16, dtype=torch.long)

    def fuse(t_, tm, v, vm):
        seen["text"] = t_
        return v, t_ + v[:, :1]

    logits = reversed_clip_logits(encode_vision, fuse, ITMHead(d), pixels, text, tmask, share=0.5)
    assert logits.shape == (2, 2) and logits.dtype == torch.float32
    assert torch.equal(seen["pixels"], pixels[:2, :, [2, 1, 0]])        # the first two clips, frames reversed
    assert torch.equal(seen["text"], text[:2])                          # each with its own caption
    assert reversed_clip_logits(encode_vision, fuse, ITMHead(d), pixels, text, tmask, share=0.1) is None
    images = pixels[:, :, :1]                                           # T = 1: nothing to reverse
    assert reversed_clip_logits(encode_vision, fuse, ITMHead(d), images, text, tmask, share=1.0) is None
    with pytest.raises(ValueError, match="reversed share"):
        reversed_clip_logits(encode_vision, fuse, ITMHead(d), pixels, text, tmask, share=1.5)
