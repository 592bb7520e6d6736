"""Dual-vision encoder (release ``VideoFormer``): a CLIP ViT run per frame, with two local temporal modules per block.

Model-spec 3.1. Each block is ``LT1 -> spatial MHSA -> LT2 -> MLP``; the LT modules only touch patch tokens and are
exactly zero at init (zero-initialised last conv), so a freshly built encoder *is* the per-frame CLIP ViT and the
CLS output is ``ln_post(mean_t CLS_t)``. Parameter names follow OpenAI CLIP (``conv1``, ``ln_pre``,
``blocks.i.attn.in_proj_weight``, ``mlp.c_fc``), so importing CLIP weights is a renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug2.config import VisionConfig
from mplug2.models.attention import checkpointed


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (CLIP's fp16-safe norm)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at p=0 or in eval)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PackedAttention(nn.Module):
    """CLIP multi-head attention with packed ``in_proj`` (rows q, k, v) and ``out_proj``, on SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class LocalTemporal(nn.Module):
    """LT (release ``lmhra``): LN -> 1x1x1 conv C->C/2 -> depthwise (3,1,1) conv -> QuickGELU -> 1x1x1 conv C/2->C.

    The last conv is zero-initialised so the module starts as exact zero (its block starts as plain CLIP).
    """

    def __init__(self, width: int, bottleneck: int, eps: float):
        super().__init__()
        self.ln = LayerNorm(width, eps=eps)
        self.down_proj = nn.Conv3d(width, bottleneck, kernel_size=1)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=bottleneck)
        self.act = QuickGELU()
        self.up_proj = nn.Conv3d(bottleneck, width, kernel_size=1)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: Tensor, b: int, t: int, hw: tuple[int, int]) -> Tensor:
        """x: patch tokens (B*T, H*W, C) -> update of the same shape.

        Computed channel-last with the Conv3d parameters: the 1x1x1 convs are matmuls and the depthwise (3,1,1)
        conv is a weighted sum of the previous / current / next frame. Same maths as the convs (see
        ``forward_conv3d``), but cuDNN runs the depthwise 3-D weight gradient one group at a time, which made
        it 94% of a Base training step on an H100 in bf16."""
        bt, n, c = x.shape
        cb = self.down_proj.out_channels
        h = self.ln(x).view(b, t, n, c)
        h = F.linear(h, self.down_proj.weight.view(cb, c), self.down_proj.bias)
        w = self.conv.weight.view(cb, 3).to(h.dtype)
        pad = F.pad(h, (0, 0, 0, 0, 1, 1))  # zero frame before and after
        h = pad[:, :-2] * w[:, 0] + pad[:, 1:-1] * w[:, 1] + pad[:, 2:] * w[:, 2] + self.conv.bias.to(h.dtype)
        h = F.linear(self.act(h), self.up_proj.weight.view(c, cb), self.up_proj.bias)
        return h.reshape(bt, n, c)

    def forward_conv3d(self, x: Tensor, b: int, t: int, hw: tuple[int, int]) -> Tensor:
        """Reference path through the Conv3d modules on (B, C, T, H, W), as the release computes it."""
        bt, n, c = x.shape
        h = self.ln(x).view(b, t, hw[0], hw[1], c).permute(0, 4, 1, 2, 3)
        h = self.up_proj(self.act(self.conv(self.down_proj(h))))
        return h.permute(0, 2, 3, 4, 1).reshape(bt, n, c)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """``x_p += LT1(x_p); x += MHSA(ln_1(x)); x_p += LT2(x_p); x += MLP(ln_2(x))`` (pre-LN, per frame)."""

    def __init__(self, cfg: VisionConfig, drop_path: float):
        super().__init__()
        w = cfg.width
        self.lt1 = LocalTemporal(w, cfg.lt_bottleneck, cfg.ln_eps)
        self.ln_1 = LayerNorm(w, eps=cfg.ln_eps)
        self.attn = PackedAttention(w, cfg.heads)
        self.lt2 = LocalTemporal(w, cfg.lt_bottleneck, cfg.ln_eps)
        self.ln_2 = LayerNorm(w, eps=cfg.ln_eps)
        self.mlp = Mlp(w, w * cfg.mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def _lt(self, lt: LocalTemporal, x: Tensor, b: int, t: int, hw: tuple[int, int]) -> Tensor:
        patches = x[:, 1:]
        upd = self.drop_path(lt(patches, b, t, hw))
        return torch.cat([x[:, :1], patches + upd], dim=1)

    def forward(self, x: Tensor, b: int, t: int, hw: tuple[int, int], use_lt: bool) -> Tensor:
        if use_lt:
            x = self._lt(self.lt1, x, b, t, hw)
        x = x + self.drop_path(self.attn(self.ln_1(x)))
        if use_lt:
            x = self._lt(self.lt2, x, b, t, hw)
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def resize_pos_embed(pos: Tensor, new_hw: tuple[int, int]) -> Tensor:
    """Resize a (1 + g*g, D) CLIP positional embedding to (1 + h*w, D), bilinear over the grid part."""
    n = pos.shape[0] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"positional embedding with {n} grid rows is not a square grid")
    if (g, g) == tuple(new_hw):
        return pos
    grid = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


class VisionEncoder(nn.Module):
    """CLIP-normalised pixels (B, 3, T, H, W) -> V0 (B, 1 + T*HW, Dv): video CLS then frame-major patches.

    ``num_frames`` is the clip length used when ``image_mode='repeat'`` turns a T=1 input into a repeated clip.
    """

    def __init__(self, cfg: VisionConfig, num_frames: int = 1, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.num_frames = num_frames
        self.activation_checkpointing = activation_checkpointing
        w, p = cfg.width, cfg.patch_size
        if cfg.temporal_downsampling:
            self.conv1 = nn.Conv3d(3, w, kernel_size=(3, p, p), stride=(2, p, p), padding=(1, 0, 0), bias=False)
        else:
            self.conv1 = nn.Conv3d(3, w, kernel_size=(1, p, p), stride=(1, p, p), bias=False)
        scale = w ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + cfg.grid ** 2, w))
        self.ln_pre = LayerNorm(w, eps=cfg.ln_eps)
        dpr = [cfg.drop_path * i / max(1, cfg.layers - 1) for i in range(cfg.layers)]
        self.blocks = nn.ModuleList(VisionBlock(cfg, dpr[i]) for i in range(cfg.layers))
        self.ln_post = LayerNorm(w, eps=cfg.ln_eps)

    def forward_frames(self, pixels: Tensor, return_hidden: bool = False
                       ) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        """Run the blocks; returns per-frame tokens (B, T, 1+HW, Dv) before ``ln_post``, the grid, and the
        per-block hidden states (B*T, 1+HW, Dv) when asked (index 0 = after ``ln_pre``, as HF)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, T, H, W), got {tuple(pixels.shape)}")
        b, _, t, _, _ = pixels.shape
        use_lt = True
        if t == 1:
            mode = self.cfg.image_mode
            if mode == "repeat" and self.num_frames > 1:
                pixels = pixels.expand(-1, -1, self.num_frames, -1, -1)
            use_lt = mode != "skip"
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (B, Dv, T', gh, gw)
        _, c, t, gh, gw = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(b * t, gh * gw, c)
        cls = self.class_embedding.to(x.dtype).expand(b * t, 1, c)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(self.positional_embedding, (gh, gw)).to(x.dtype)
        x = self.ln_pre(x)
        hidden = [x] if return_hidden else []
        for blk in self.blocks:
            x = checkpointed(blk, x, b, t, (gh, gw), use_lt, enabled=self.activation_checkpointing)
            if return_hidden:
                hidden.append(x)
        return x.view(b, t, 1 + gh * gw, c), (gh, gw), hidden

    def forward(self, pixels: Tensor) -> Tensor:
        x, _, _ = self.forward_frames(pixels)
        b, t, n, c = x.shape
        cls = x[:, :, 0].mean(dim=1, keepdim=True)
        patches = x[:, :, 1:].reshape(b, t * (n - 1), c)
        return self.ln_post(torch.cat([cls, patches], dim=1))
