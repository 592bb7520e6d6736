"""Behavioural invariants of text, universal layers, fusion, decoder and generation (model-spec 3.2-3.5, 9)."""

from __future__ import annotations

import pytest
import torch

from mplug2.models.mplug2 import MPLUG2

from .helpers import padded_batch, tiny

ATOL = 1e-5


def build(seed: int = 0, **overrides) -> MPLUG2:
    torch.manual_seed(seed)
    return MPLUG2(tiny(**overrides)).eval()


def memory(b: int = 2, m: int = 9, d: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, d, generator=g), torch.ones(b, m, dtype=torch.long)


def test_text_padding_never_changes_non_pad_positions():
    model = build()
    ids, mask = padded_batch(128, [6, 6])
    long_ids = torch.cat([ids, torch.randint(5, 128, (2, 4))], 1)
    long_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model.encode_text(ids, mask)
        b = model.encode_text(long_ids, long_mask)
        assert (a - b[:, :6]).abs().max() < ATOL
        v, vm = model.encode_vision(torch.randn(2, 3, 4, 32, 32))
        _, t1 = model.fuse(a, mask, v, vm)
        _, t2 = model.fuse(b, long_mask, v, vm)
        assert (t1 - t2[:, :6]).abs().max() < ATOL


def test_universal_layers_keep_length_and_are_permutation_equivariant():
    model = build()
    v0 = torch.randn(3, 21, 32)
    with torch.no_grad():
        v, q = model.text.universal(v0)
        perm = torch.randperm(21)
        vp, _ = model.text.universal(v0[:, perm])
        assert v.shape == v0.shape and q.shape == (3, model.config.text.num_latents, 32)
        assert (vp - v[:, perm]).abs().max() < ATOL
        # a sample's output does not depend on the rest of the batch
        v1, _ = model.text.universal(v0[1:2])
        assert (v1 - v[1:2]).abs().max() < ATOL
        # and it really uses the latents (not a pass-through)
        model.text.latents.add_(1.0)
        v_changed, _ = model.text.universal(v0)
        assert (v_changed - v).abs().max() > 1e-4


def test_token_compression_outputs_cls_plus_queries():
    model = build(token_compression=True)
    with torch.no_grad():
        v, vm = model.encode_vision(torch.randn(2, 3, 4, 32, 32))
    assert v.shape == (2, 1 + model.config.text.num_latents, 32) and vm.shape == (2, 5)
    full = build()
    with torch.no_grad():
        vf, _ = full.encode_vision(torch.randn(2, 3, 4, 32, 32))
    assert vf.shape == (2, 1 + 4 * 16, 32)


def test_co_attention_only_fusion_leaves_visual_stream_bit_identical():
    model = build(fusion__stride_layer=100)
    assert not any(model.fusion.is_connected(j) for j in range(model.config.fusion.layers))
    ids, mask = padded_batch(128, [5, 3])
    v = torch.randn(2, 11, 32)
    with torch.no_grad():
        vf, tf = model.fuse(model.encode_text(ids, mask), mask, v, torch.ones(2, 11, dtype=torch.long))
    assert torch.equal(vf, v)
    assert tf.shape == (2, 5, 32)


def test_connected_layer_changes_visual_stream_at_that_layer_only():
    model = build(fusion__layers=3, fusion__stride_layer=2)  # co, co, connected
    assert [model.fusion.is_connected(j) for j in range(3)] == [False, False, True]
    ids, mask = padded_batch(128, [5, 3])
    v = torch.randn(2, 11, 32)
    vm = torch.ones(2, 11, dtype=torch.long)
    with torch.no_grad():
        t = model.encode_text(ids, mask)
        vf, _ = model.fuse(t, mask, v, vm)
        model.fusion.layer = model.fusion.layer[:2]
        v2, _ = model.fuse(t, mask, v, vm)
    assert torch.equal(v2, v) and (vf - v).abs().max() > 1e-4


def test_decoder_causal_mask_hides_the_future():
    model = build()
    mem, mm = memory()
    ids = torch.randint(5, 128, (2, 7))
    mask = torch.ones_like(ids)
    ids2 = ids.clone()
    ids2[:, 4:] = torch.randint(5, 128, (2, 3))
    with torch.no_grad():
        a = model.decode(ids, mask, mem, mm).logits
        b = model.decode(ids2, mask, mem, mm).logits
    assert (a[:, :4] - b[:, :4]).abs().max() < ATOL
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4


def test_masked_memory_has_no_effect():
    model = build()
    mem, mm = memory(m=6)
    mm[:, 4:] = 0
    mem2 = mem.clone()
    mem2[:, 4:] = 100 * torch.randn(2, 2, 32)
    ids = torch.randint(5, 128, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model.decode(ids, mask, mem, mm).logits
        b = model.decode(ids, mask, mem2, mm).logits
        assert (a - b).abs().max() < ATOL
        assert model.generate(mem, mm) == model.generate(mem2, mm)


def test_decoder_losses_reductions_and_distillation():
    model = build()
    mem, mm = memory()
    ids, mask = padded_batch(128, [6, 4])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt carries no loss
    out_mean = model.decode(ids, mask, mem, mm, labels, reduction="token_mean")
    out_sum = model.decode(ids, mask, mem, mm, labels, reduction="sequence_sum")
    out_none = model.decode(ids, mask, mem, mm, labels, reduction="none")
    n_tok = (labels[:, 1:] != -100).sum()
    assert out_none.loss.shape == (2,)
    assert torch.allclose(out_none.loss.sum() / n_tok, out_mean.loss, atol=1e-6)
    assert torch.allclose(out_none.loss.mean(), out_sum.loss, atol=1e-6)
    # hand-written CE over the valid shifted positions
    logp = out_mean.logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    manual = -logp[valid].gather(-1, tgt[valid][:, None]).sum() / valid.sum()
    assert torch.allclose(manual, out_mean.loss, atol=1e-6)
    # changing a prompt/pad target never changes the loss
    ids2 = ids.clone()
    ids2[0, 5] = 7 if ids[0, 5] != 7 else 8  # position 5 of row 0 is a real token: loss must change
    assert not torch.allclose(model.decode(ids2, mask, mem, mm, ids2.masked_fill(mask == 0, -100)).loss,
                              model.decode(ids, mask, mem, mm, ids.masked_fill(mask == 0, -100)).loss)
    # soft targets equal to the model's own distribution: alpha mixes CE with the entropy
    soft = out_mean.logits.detach()
    dist = model.decode(ids, mask, mem, mm, labels, soft_logits=soft, alpha=0.4)
    ent = -(soft[:, :-1].softmax(-1) * soft[:, :-1].log_softmax(-1)).sum(-1)[valid].mean()
    assert torch.allclose(dist.loss, 0.6 * out_mean.loss + 0.4 * ent, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        model.decode(ids, mask, mem, mm, labels, reduction="mean")


def test_cached_generation_equals_uncached_tokens_and_scores():
    model = build(seed=3)
    mem, mm = memory(b=3, seed=4)
    for beams in (1, 3):
        a = model.generate_with_scores(mem, mm, num_beams=beams, max_length=5, min_length=2, use_cache=True)
        b = model.generate_with_scores(mem, mm, num_beams=beams, max_length=5, min_length=2, use_cache=False)
        assert a.sequences == b.sequences
        assert all(abs(x - y) < 1e-5 for x, y in zip(a.scores, b.scores))
    prompt = torch.tensor([2, 40, 41])
    a = model.generate_with_scores(mem, mm, prompt_ids=prompt, use_cache=True)
    b = model.generate_with_scores(mem, mm, prompt_ids=prompt, use_cache=False)
    assert a.sequences == b.sequences


def test_beam_one_equals_greedy_and_matches_manual_argmax():
    from mplug2.generation import beam_search
    model = build(seed=5)
    mem, mm = memory(b=2, seed=6)
    cfg = model.config
    greedy = model.generate(mem, mm, num_beams=1, max_length=5, min_length=0)
    beam1 = beam_search(model.decoder, mem, mm, num_beams=1, max_length=5, min_length=0,
                        bos_token_id=cfg.decoder.bos_token_id, eos_token_id=cfg.decoder.eos_token_id)
    assert beam1.sequences == greedy
    # manual uncached argmax loop for sample 0
    ids = torch.tensor([[cfg.decoder.bos_token_id]])
    manual = []
    with torch.no_grad():
        for _ in range(5):
            nxt = model.decode(ids, torch.ones_like(ids), mem[:1], mm[:1]).logits[0, -1].argmax().item()
            if nxt == cfg.decoder.eos_token_id:
                break
            manual.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert greedy[0] == manual


def test_no_eos_before_min_length_and_max_length_respected():
    model = build(seed=7)
    eos = model.config.decoder.eos_token_id
    with torch.no_grad():  # make EOS overwhelmingly likely everywhere
        model.decoder.lm_head.bias[eos] = 50.0
    mem, mm = memory(b=2)
    for beams in (1, 2):
        out = model.generate(mem, mm, num_beams=beams, max_length=6, min_length=3)
        assert all(len(s) == 3 for s in out), out  # EOS right after the minimum
        out0 = model.generate(mem, mm, num_beams=beams, max_length=6, min_length=0)
        assert all(len(s) == 0 for s in out0)
    with torch.no_grad():
        model.decoder.lm_head.bias[eos] = -50.0
    out = model.generate(mem, mm, num_beams=2, max_length=4, min_length=0)
    assert all(len(s) == 4 and eos not in s for s in out)


def test_allowed_token_ids_constrain_decoding():
    model = build(seed=8)
    mem, mm = memory(b=2)
    box = list(range(14, 47))
    for beams in (1, 3):
        out = model.generate(mem, mm, num_beams=beams, max_length=4, min_length=4, allowed_token_ids=box)
        assert all(len(s) == 4 and set(s) <= set(box) for s in out), out
    with pytest.raises(ValueError, match="allowed_token_ids"):
        model.generate(mem, mm, allowed_token_ids=[1000])


def test_beam_search_finds_a_better_sequence_score_than_greedy_or_equal():
    model = build(seed=9)
    mem, mm = memory(b=4, seed=10)
    g = model.generate_with_scores(mem, mm, num_beams=1, max_length=5, min_length=5)
    b = model.generate_with_scores(mem, mm, num_beams=4, max_length=5, min_length=5)
    # with fixed length the GNMT penalty is identical, so beam search can only do better
    assert all(bs >= gs - 1e-5 for bs, gs in zip(b.scores, g.scores))


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = build(seed=11, fusion__stride_layer=1)
    model.save_pretrained(tmp_path / "m")
    again = MPLUG2.from_pretrained(tmp_path / "m").eval()
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.mlm_head.decoder.weight is again.text.embeddings.word_embeddings.weight
    assert again.decoder.lm_head.decoder.weight is again.decoder.embeddings.word_embeddings.weight
    mem, mm = memory()
    assert again.generate(mem, mm) == model.generate(mem, mm)
    with pytest.raises(FileNotFoundError):
        MPLUG2.from_pretrained(tmp_path / "nothing")


def test_full_model_backward_reaches_every_module():
    model = build()
    model.train()
    ids, mask = padded_batch(128, [6, 4])
    v, vm = model.encode_vision(torch.randn(2, 3, 4, 32, 32))
    t = model.encode_text(ids, mask)
    vf, tf = model.fuse(t, mask, v, vm)
    out = model.decode(ids, mask, torch.cat([vf, tf], 1), torch.cat([vm, mask], 1), ids.masked_fill(mask == 0, -100))
    (out.loss + model.mlm_logits(tf).logsumexp(-1).mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []  # every allocated parameter is used (DDP without find_unused_parameters)
    assert model.fusion.layer[1].crossattention is None  # tiny: layer 1 is connected
