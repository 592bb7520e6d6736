"""Dual-vision encoder (model-spec 3.1, 9): CLIP parity (HF + OpenAI keys), pos-emb resize, per-frame ViT at init,
activation checkpointing, LT locality, image modes and temporal downsampling."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from mplug2.config import VisionConfig
from mplug2.models.mplug2 import MPLUG2
from mplug2.models.vision import LocalTemporal, VisionEncoder, resize_pos_embed
from mplug2.weights import clip_to_vision, load_pretrained

from .helpers import tiny

ATOL = 1e-5
VCFG = VisionConfig(width=32, layers=2, heads=2, patch_size=8, image_res=32)


def hf_clip(image_size: int = 32, width: int = 32, seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_act="quick_gelu", hidden_size=width, intermediate_size=4 * width,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                                         patch_size=8, layer_norm_eps=1e-5)).eval()
    with torch.no_grad():  # non-trivial norms and biases so a mis-mapped tensor shows
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return m


def to_openai(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF CLIPVisionModel dict to OpenAI ``visual.`` keys (q/k/v packed), plus a text-tower key."""
    out = {}
    hf_sd = {k.removeprefix("vision_model."): v for k, v in hf_sd.items()}
    for r, v in hf_sd.items():
        if r == "embeddings.patch_embedding.weight":
            out["visual.conv1.weight"] = v
        elif r == "embeddings.class_embedding":
            out["visual.class_embedding"] = v
        elif r == "embeddings.position_embedding.weight":
            out["visual.positional_embedding"] = v
        elif r.startswith("pre_layrnorm."):
            out["visual.ln_pre." + r.split(".")[-1]] = v
        elif r.startswith("post_layernorm."):
            out["visual.ln_post." + r.split(".")[-1]] = v
        elif r.startswith("encoder.layers."):
            parts = r.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            pre = f"visual.transformer.resblocks.{i}."
            if rest.startswith("self_attn.q_proj"):
                kind = rest.split(".")[-1]
                out[pre + f"attn.in_proj_{kind}"] = torch.cat(
                    [hf_sd[f"encoder.layers.{i}.self_attn.{c}_proj.{kind}"] for c in "qkv"])
            elif rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                continue
            else:
                rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                        .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
                out[pre + rest] = v
    out["visual.proj"] = torch.zeros(32, 16)
    out["logit_scale"] = torch.tensor(4.6)
    out["token_embedding.weight"] = torch.zeros(10, 16)
    return out


def encoder_from(sd, cfg: VisionConfig = VCFG, num_frames: int = 1) -> VisionEncoder:
    enc = VisionEncoder(cfg, num_frames=num_frames).eval()
    mapped, _, _ = clip_to_vision(sd, cfg, prefix="")
    missing, unexpected = enc.load_state_dict(mapped, strict=False)
    assert not unexpected and all(".lt" in k for k in missing), missing
    return enc


@pytest.fixture(scope="module")
def ref():
    return hf_clip()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("image_mode", ["skip", "centre"])
def test_matches_hf_clip_per_block_at_t1(ref, pixels, image_mode):
    cfg = dataclasses.replace(VCFG, image_mode=image_mode)
    enc = encoder_from(ref.state_dict(), cfg)
    with torch.no_grad():
        out = ref(pixel_values=pixels[:, :, 0], output_hidden_states=True)
        frames, _, hidden = enc.forward_frames(pixels, return_hidden=True)
        ours = enc(pixels)
    assert len(hidden) == len(out.hidden_states) == VCFG.layers + 1
    for i, (a, b) in enumerate(zip(hidden, out.hidden_states)):
        assert (a - b).abs().max() < ATOL, f"hidden state {i}"
    expected = getattr(ref, "vision_model", ref).post_layernorm(out.last_hidden_state)  # HF normalises only the pooled CLS
    assert ours.shape == (2, 17, 32)
    assert (ours - expected).abs().max() < ATOL
    assert (ours[:, 0] - out.pooler_output).abs().max() < ATOL


def test_openai_keys_give_identical_outputs_and_text_tower_is_dropped(ref, pixels):
    hf_enc = encoder_from(ref.state_dict())
    oa_sd = to_openai(ref.state_dict())
    oa_enc = encoder_from(oa_sd)
    with torch.no_grad():
        assert torch.equal(hf_enc(pixels), oa_enc(pixels))
    _, _, dropped = clip_to_vision(oa_sd, VCFG)
    assert set(dropped) == {"visual.proj", "logit_scale", "token_embedding.weight"}
    # fp16 archives are cast to the model dtype
    half = {k: v.half() for k, v in oa_sd.items()}
    model = MPLUG2(tiny())
    load_pretrained(model, clip=half)
    assert model.vision.conv1.weight.dtype == torch.float32
    bad = dict(oa_sd, **{"visual.transformer.resblocks.0.attn.rope": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys"):
        clip_to_vision(bad, VCFG)


def test_other_grid_gets_positional_embedding_resized(pixels):
    big = hf_clip(image_size=48)  # grid 6x6 -> our 4x4
    pos = getattr(big, "vision_model", big).embeddings.position_embedding.weight.detach()
    mapped, _, _ = clip_to_vision(big.state_dict(), VCFG, prefix="")
    got = mapped["positional_embedding"]
    assert got.shape == (17, 32)
    assert torch.equal(got[0], pos[0])  # class position untouched
    grid = torch.nn.functional.interpolate(pos[1:].T.reshape(1, 32, 6, 6), size=(4, 4), mode="bilinear",
                                           align_corners=False)
    assert torch.allclose(got[1:], grid.reshape(32, 16).T, atol=1e-6)
    assert torch.equal(resize_pos_embed(got, (4, 4)), got)  # same grid: unchanged


def test_video_at_init_is_a_per_frame_vit(ref):
    enc = encoder_from(ref.state_dict(), num_frames=4)
    video = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = enc(video)
        per_frame = [enc.forward_frames(video[:, :, t:t + 1])[0][:, 0] for t in range(4)]  # (B, 17, D) pre-ln_post
        assert out.shape == (2, 1 + 4 * 16, 32)
        cls = enc.ln_post(torch.stack([f[:, 0] for f in per_frame], 1).mean(1))
        assert (out[:, 0] - cls).abs().max() < ATOL
        for t in range(4):
            block = out[:, 1 + 16 * t: 1 + 16 * (t + 1)]
            assert (block - enc.ln_post(per_frame[t][:, 1:])).abs().max() < ATOL
        # permuting frames permutes patch blocks, CLS unchanged
        perm = [2, 0, 3, 1]
        out_p = enc(video[:, :, perm])
        assert (out_p[:, 0] - out[:, 0]).abs().max() < ATOL
        assert (out_p[:, 1:17] - out[:, 1 + 16 * 2: 1 + 16 * 3]).abs().max() < ATOL


def test_image_modes_agree_at_init(ref, pixels):
    outs = {}
    for mode in ("skip", "centre", "repeat"):
        enc = encoder_from(ref.state_dict(), dataclasses.replace(VCFG, image_mode=mode), num_frames=3)
        with torch.no_grad():
            outs[mode] = enc(pixels)
    assert outs["skip"].shape == outs["centre"].shape == (2, 17, 32)
    assert outs["repeat"].shape == (2, 1 + 3 * 16, 32)
    assert (outs["skip"] - outs["centre"]).abs().max() < ATOL
    assert (outs["repeat"][:, 0] - outs["skip"][:, 0]).abs().max() < ATOL
    for t in range(3):
        assert (outs["repeat"][:, 1 + 16 * t: 17 + 16 * t] - outs["skip"][:, 1:]).abs().max() < ATOL


def test_skip_mode_bypasses_lt_but_centre_runs_it(pixels):
    torch.manual_seed(0)
    enc = VisionEncoder(VCFG).eval()
    for blk in enc.blocks:
        torch.nn.init.normal_(blk.lt1.up_proj.weight, std=0.5)
    base = enc(pixels)
    enc_c = copy.deepcopy(enc)
    enc_c.cfg = dataclasses.replace(VCFG, image_mode="centre")
    with torch.no_grad():
        assert torch.equal(base, enc(pixels))
        assert (enc_c(pixels) - base).abs().max() > 1e-3


def test_lt_perturbation_is_local_to_neighbouring_frames():
    torch.manual_seed(0)
    lt = LocalTemporal(32, 16, 1e-5)
    torch.nn.init.normal_(lt.up_proj.weight, std=0.5)
    b, t, hw = 2, 5, (4, 4)
    x = torch.randn(b * t, 16, 32)
    x2 = x.clone().view(b, t, 16, 32)
    x2[:, 0] += torch.randn(b, 16, 32)
    with torch.no_grad():
        d = (lt(x2.view(b * t, 16, 32), b, t, hw) - lt(x, b, t, hw)).view(b, t, 16, 32).abs().amax(dim=(0, 2, 3))
    assert d[0] > 1e-3 and d[1] > 1e-3
    assert torch.all(d[2:] == 0)


def test_lt_is_exactly_zero_at_init():
    lt = LocalTemporal(32, 16, 1e-5)
    x = torch.randn(8, 16, 32)
    assert torch.equal(lt(x, 2, 4, (4, 4)), torch.zeros_like(x))


def test_activation_checkpointing_gives_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain = VisionEncoder(VCFG, activation_checkpointing=False)
    for blk in plain.blocks:
        torch.nn.init.normal_(blk.lt1.up_proj.weight, std=0.2)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    video = torch.randn(2, 3, 4, 32, 32)
    outs, grads = [], []
    for enc in (plain, ckpt):
        enc.zero_grad()
        y = enc(video)
        (y.square().mean()).backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=0), n


def test_temporal_downsampling_halves_frames_and_keeps_centre_tap(ref):
    cfg = dataclasses.replace(VCFG, temporal_downsampling=True)
    enc = encoder_from(ref.state_dict(), cfg, num_frames=4)
    plain = encoder_from(ref.state_dict(), num_frames=4)
    video = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        out = enc(video)
        ref_out = plain(video[:, :, [0, 2]])
    assert out.shape == (1, 1 + 2 * 16, 32)
    assert (out - ref_out).abs().max() < ATOL


def test_bad_pixel_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        VisionEncoder(VCFG)(torch.randn(2, 3, 32, 32))


def test_hub_style_vision_model_prefix_and_clipmodel_extras(ref, pixels):
    sd = {"vision_model." + k: v for k, v in ref.state_dict().items()}
    sd.update({"visual_projection.weight": torch.zeros(16, 32), "logit_scale": torch.tensor(2.0),
               "text_model.embeddings.token_embedding.weight": torch.zeros(10, 16)})
    mapped, _, dropped = clip_to_vision(sd, VCFG, prefix="")
    flat, _, _ = clip_to_vision(ref.state_dict(), VCFG, prefix="")
    assert mapped.keys() == flat.keys() and all(torch.equal(mapped[k], flat[k]) for k in flat)
    assert set(dropped) == {"visual_projection.weight", "logit_scale", "text_model.embeddings.token_embedding.weight"}


def test_lt_fast_path_equals_conv3d_reference_values_and_gradients():
    torch.manual_seed(0)
    lt = LocalTemporal(32, 16, 1e-5)
    torch.nn.init.normal_(lt.up_proj.weight, std=0.5)
    torch.nn.init.normal_(lt.conv.bias, std=0.5)
    x = torch.randn(2 * 3, 16, 32, requires_grad=True)
    outs, grads = [], []
    for fn in (lt.forward, lt.forward_conv3d):
        lt.zero_grad()
        x.grad = None
        y = fn(x, 2, 3, (4, 4))
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in lt.parameters()])
    assert (outs[0] - outs[1]).abs().max() < ATOL
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-4
