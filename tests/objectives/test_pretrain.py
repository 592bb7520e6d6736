"""The pretraining wrapper on the tiny model: over-fitting one batch, distillation/queue path, optimiser groups."""

from __future__ import annotations

import pytest
import torch

from mplug2.config import MPLUG2Config
from mplug2.models.mplug2 import MPLUG2
from mplug2.objectives.pretrain import MPLUG2Pretrainer, PretrainConfig, is_no_decay
from tests.tiny import distinct_pixels, fit_batch, one_thread, tok  # noqa: F401  (fixtures)

CAPTIONS = ["a man playing", "the dog is on a cat", "a woman in the video", "what is the person playing"]


def make_batch(tok, b: int = 4) -> dict:
    enc = tok(CAPTIONS[:b], max_length=12)
    return {"pixels": distinct_pixels(b), **enc, "ids": torch.arange(b)}


def test_tiny_model_overfits_one_batch_on_every_loss(tok):
    torch.manual_seed(0)
    pt = MPLUG2Pretrainer(MPLUG2(MPLUG2Config.preset("tiny")), tok, PretrainConfig(queue_size=0, distill=False))
    hist = fit_batch(pt, make_batch(tok), 120, ("itc", "itm", "mlm", "prefix_lm"), lr=1e-3)
    first = hist[0]
    last = {k: sum(h[k] for h in hist[-5:]) / 5 for k in first}
    assert first["itc"] > 1.0 and last["itc"] < 0.05
    assert first["itm"] > 0.6 and last["itm"] < 0.35
    assert last["mlm"] < 0.7 * first["mlm"]          # masks are re-drawn every step: noisy but falling
    assert last["prefix_lm"] < 0.45 * first["prefix_lm"]


def test_queue_and_distillation_path(tok):
    torch.manual_seed(0)
    model = MPLUG2(MPLUG2Config.preset("tiny"))
    pt = MPLUG2Pretrainer(model, tok, PretrainConfig(global_batch=4, alpha_ramp_steps=2, momentum=0.5))
    assert pt.itc.use_queue and pt.itc.cfg.queue_size == 32
    twin = pt.momentum["model"]
    assert all(not p.requires_grad for p in twin.parameters())
    opt = torch.optim.AdamW(pt.param_groups(1e-3, 1e-4, 0.02))
    batch = make_batch(tok)
    alphas = []
    for step in range(3):
        out = pt(batch)
        alphas.append(out["alpha"].item())
        assert all(torch.isfinite(out[k]) for k in ("loss", "itc", "itm", "mlm", "prefix_lm"))
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in twin.parameters())
        opt.step()
        before = [p.clone() for p in twin.parameters()]
        pt.momentum_update()
        for b_, t_, o_ in zip(before, twin.parameters(), model.parameters()):
            torch.testing.assert_close(t_, 0.5 * b_ + 0.5 * o_)
        assert int(pt.itc.queue_ptr) == ((step + 1) * 4) % 32
    assert alphas == pytest.approx([0.0, 0.2, 0.4])  # linear ramp over 2 updates to alpha=0.4
    assert int(pt.num_updates) == 3 and "num_updates" in pt.state_dict()


def test_bad_queue_size_fails_at_startup(tok):
    with pytest.raises(ValueError, match="not a multiple"):
        MPLUG2Pretrainer(MPLUG2(MPLUG2Config.preset("tiny")), tok, PretrainConfig(global_batch=6))


def test_param_groups_follow_the_decay_and_lr_rules(tok):
    pt = MPLUG2Pretrainer(MPLUG2(MPLUG2Config.preset("tiny")), tok, PretrainConfig(queue_size=0, distill=False))
    groups = {g["name"]: g for g in pt.param_groups(lr=1e-4, lr_vision=1e-5, weight_decay=0.02)}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    named = dict(pt.named_parameters())
    no_decay = ids["vision_no_decay"] | ids["rest_no_decay"]
    for name in ("model.vision.positional_embedding", "model.vision.class_embedding", "model.text.latents",
                 "itc.temp", "model.text.embeddings.position_embeddings.weight",
                 "model.decoder.embeddings.position_embeddings.weight", "model.vision.ln_pre.weight"):
        assert id(named[name]) in no_decay, name
    assert id(named["model.text.embeddings.word_embeddings.weight"]) in ids["rest_decay"]
    assert id(named["itc.vision_proj.weight"]) in ids["rest_decay"]
    assert all(n.startswith("model.vision.") == (id(p) in ids["vision_decay"] | ids["vision_no_decay"])
               for n, p in named.items())
    assert groups["vision_decay"]["lr"] == 1e-5 and groups["rest_decay"]["lr"] == 1e-4
    assert groups["rest_no_decay"]["weight_decay"] == 0.0 and groups["rest_decay"]["weight_decay"] == 0.02
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len({id(p) for p in pt.parameters() if p.requires_grad})  # each trainable tensor once
    assert is_no_decay("x.bias", torch.zeros(3)) and not is_no_decay("x.weight", torch.zeros(3, 3))


def test_temperature_gets_its_own_learning_rate(tok):
    """``lr_temp`` puts the ITC temperature in a group of its own (no decay): at a small model's lr (2e-3) Adam
    would move the scalar by ~2e-3 a step and run it from 0.07 to its floor within a few dozen steps."""
    pt = MPLUG2Pretrainer(MPLUG2(MPLUG2Config.preset("tiny")), tok, PretrainConfig(queue_size=0, distill=False))
    groups = {g["name"]: g for g in pt.param_groups(lr=2e-3, lr_vision=2e-3, weight_decay=0.02, lr_temp=1e-4)}
    assert [id(p) for p in groups["temp"]["params"]] == [id(pt.itc.temp)]
    assert groups["temp"]["lr"] == 1e-4 and groups["temp"]["weight_decay"] == 0.0
    assert all(id(pt.itc.temp) not in {id(p) for p in g["params"]} for n, g in groups.items() if n != "temp")
    assert "temp" not in {g["name"] for g in pt.param_groups(lr=2e-3, lr_vision=2e-3, weight_decay=0.02)}


def test_temporal_modules_get_their_own_learning_rate(tok):
    """``lr_temporal`` puts every LocalTemporal parameter (and only those) in ``temporal_*`` groups at that rate,
    with the usual decay rule; without it they stay in the vision groups at ``lr_vision``."""
    from mplug2.models.vision import LocalTemporal

    pt = MPLUG2Pretrainer(MPLUG2(MPLUG2Config.preset("tiny")), tok, PretrainConfig(queue_size=0, distill=False))
    lt = {id(p) for m in pt.modules() if isinstance(m, LocalTemporal) for p in m.parameters() if p.requires_grad}
    assert lt
    groups = {g["name"]: g for g in pt.param_groups(lr=2e-3, lr_vision=1e-3, weight_decay=0.02, lr_temporal=1e-2)}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    assert ids["temporal_decay"] | ids["temporal_no_decay"] == lt
    assert not lt & (ids["vision_decay"] | ids["vision_no_decay"] | ids["rest_decay"] | ids["rest_no_decay"])
    assert groups["temporal_decay"]["lr"] == groups["temporal_no_decay"]["lr"] == 1e-2
    assert groups["temporal_decay"]["weight_decay"] == 0.02 and groups["temporal_no_decay"]["weight_decay"] == 0.0
    assert sum(len(g) for g in ids.values()) == len({id(p) for p in pt.parameters() if p.requires_grad})
    plain = {g["name"]: g for g in pt.param_groups(lr=2e-3, lr_vision=1e-3, weight_decay=0.02)}
    assert not any(n.startswith("temporal") for n in plain)
    assert lt <= {id(p) for n in ("vision_decay", "vision_no_decay") for p in plain[n]["params"]}


def _moving_bars(directions: list[str], t: int = 4) -> torch.Tensor:
    """Clips of a bright vertical bar sliding 3 pixels a frame to the right (or left), within patches of 8:
    each patch sees the bar's edge move one way or the other. Each clip has its own colour."""
    px = torch.full((len(directions), 3, t, 32, 32), -1.0)
    for i, d in enumerate(directions):
        for f in range(t):
            x = 9 + 3 * (f if d == "right" else t - 1 - f)
            px[i, [i % 3, (i + i // 3) % 3], f, :, x:x + 6] = 2.0
    return px


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_time_reversed_negatives_teach_itm_the_direction_of_motion(tok, share):
    """With ``itm_reversed_negatives`` ITM learns to reject a clip played backwards (the same frames, the other
    direction); without it, nothing in a batch of distinct clips tells it the arrow of time."""
    torch.manual_seed(0)
    cfg = MPLUG2Config.preset("tiny")
    cfg.itm_reversed_negatives = share
    cfg.text.init_std = 0.18        # as the tiny runs trained from scratch (configs/pretrain_tiny.yaml)
    pt = MPLUG2Pretrainer(MPLUG2(cfg), tok, PretrainConfig(queue_size=0, distill=False, mlm_weight=0.0,
                                                          prefix_lm_weight=0.0))
    dirs = ["right", "left", "right", "left"]
    enc = tok([f"a bar moving {d}" for d in dirs], max_length=12)
    batch = {"pixels": _moving_bars(dirs), **enc, "ids": torch.arange(4)}
    hist = fit_batch(pt, batch, 120, ("itm",), lr=1e-3)
    assert ("itm_rev_acc" in pt(batch)) == (share > 0)
    pt.eval()
    with torch.no_grad():
        text = pt.model.encode_text(enc["input_ids"], enc["attention_mask"])
        p_match = []
        for px in (batch["pixels"], batch["pixels"].flip(2)):
            vis, vmask = pt.model.encode_vision(px)
            _, fused = pt.model.fuse(text, enc["attention_mask"], vis, vmask)
            p_match.append(pt.itm_head(fused).softmax(-1)[:, 1])
    own, backwards = p_match
    told_apart = bool((own > 0.5).all() and (backwards < 0.5).all())
    assert told_apart == (share > 0), (own, backwards, hist[-1])
