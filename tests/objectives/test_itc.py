"""ITC: hand-written CE parity, soft targets, queue pointer, start-up checks, id-aware positives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug2.objectives.itc import ITCConfig, ITCHead


def _feats(b: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, e, generator=g), dim=1) for _ in range(4)]


def test_alpha0_no_queue_equals_symmetric_ce():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=0, temp=0.05))
    f_v, f_t, _, _ = _feats(5, 6, 0)
    f_v.requires_grad_(True)
    out = head(f_v, f_t)
    logits = f_v @ f_t.t() / 0.05
    labels = torch.arange(5)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    out.loss.backward()
    assert head.temp.grad is not None and f_v.grad is not None  # the temperature is learnable


def test_soft_targets_sum_to_one_and_mix_alpha():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=16))
    f_v, f_t, f_v_m, f_t_m = _feats(4, 6, 1)
    out = head(f_v, f_t, f_v_m, f_t_m, alpha=0.4)
    for t in (out.targets_i2t, out.targets_t2i):
        assert t.shape == (4, 4 + 16)
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        assert (t >= 0).all()
    # the positive gets (1 - alpha) + alpha * softmax mass
    diag = out.targets_i2t[torch.arange(4), torch.arange(4)]
    assert (diag >= 0.6 - 1e-6).all() and (diag < 1).all()


def test_queue_pointer_wraps_and_enqueues_momentum_features():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=8)).train()
    seen = []
    for step in range(5):
        f_v, f_t, f_v_m, f_t_m = _feats(4, 6, 10 + step)
        head(f_v, f_t, f_v_m, f_t_m)
        seen.append((f_v_m, f_t_m))
        assert int(head.queue_ptr) == ((step + 1) * 4) % 8
    # after 5 steps of 4 into 8 slots: slots 0-3 hold step 4, slots 4-7 hold step 3
    torch.testing.assert_close(head.vision_queue[:4], seen[4][0])
    torch.testing.assert_close(head.text_queue[4:], seen[3][1])
    ptr = int(head.queue_ptr)
    head.eval()
    f_v, f_t, f_v_m, f_t_m = _feats(4, 6, 99)
    head(f_v, f_t, f_v_m, f_t_m)
    assert int(head.queue_ptr) == ptr  # no enqueue in eval mode


def test_bad_queue_size_fails_at_startup():
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=32), global_batch=6)
    ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=32), global_batch=8)
    ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=0), global_batch=6)  # no queue, no constraint
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=32)).train()
    f = _feats(6, 6, 2)
    with pytest.raises(RuntimeError, match="not a multiple"):
        head(*f)


def test_same_id_keys_count_as_positives():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=8)).train()
    f_v, f_t, f_v_m, f_t_m = _feats(4, 6, 3)
    ids = torch.tensor([7, 7, 3, 5])
    out = head(f_v, f_t, f_v_m, f_t_m, ids=ids, alpha=0.0)
    t = out.targets_i2t
    assert t[0, :2].tolist() == [0.5, 0.5] and t[1, :2].tolist() == [0.5, 0.5]
    assert t[2, 2] == 1 and t[2].sum() == 1
    # next step: the queue remembers ids, so id 7 in the queue is a positive too
    f_v, f_t, f_v_m, f_t_m = _feats(4, 6, 4)
    out = head(f_v, f_t, f_v_m, f_t_m, ids=torch.tensor([7, 1, 2, 9]), alpha=0.0)
    row = out.targets_i2t[0]
    assert row[0] == pytest.approx(1 / 3) and row[4:6].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert row.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 0"):
        head(f_v, f_t, f_v_m, f_t_m, ids=torch.tensor([-1, 1, 2, 3]))


def test_temperature_is_clamped():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=0))
    with torch.no_grad():
        head.temp.fill_(5.0)
    f_v, f_t, _, _ = _feats(3, 6, 5)
    head(f_v, f_t)
    assert head.temp.item() == pytest.approx(0.5)


def test_queue_mode_requires_momentum_features():
    head = ITCHead(ITCConfig(width=8, embed_dim=6, queue_size=8))
    f_v, f_t, _, _ = _feats(4, 6, 6)
    with pytest.raises(ValueError, match="momentum"):
        head(f_v, f_t)
