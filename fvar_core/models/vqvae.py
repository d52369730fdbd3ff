"""VAR's VQ-VAE encoder/decoder pair (docs/var-compat.md §1.2), written to be state-dict compatible.

The module tree mirrors the official one attribute for attribute, so `state_dict()` keys and
shapes equal those of `vae_ch160v4096z32.pth` (encoder.* / decoder.*; the full list is in
`reference/var-state-dict-keys-d16.md`). Layout for the released config ch=160,
ch_mult=(1, 1, 2, 2, 4), two res-blocks per level, 256² → 16²:

    Encoder: conv_in 3→ch · 5 levels (down.i: block.0..1 [+ attn.0..1 at the last level]
             [+ downsample after every level but the last]) · mid (block_1, attn_1, block_2)
             · norm_out · silu · conv_out → z_channels
    Decoder: conv_in z→ch·4 · mid · levels 4→0 (up.i: block.0..2 [+ attn.0..2 at the last
             level] [+ upsample at every level but 0]) · norm_out · silu · conv_out → 3

`decoder.up` is stored in level order 0..4 (so keys read `up.4.attn.*` for the 16² level) but
runs 4 → 0. There is no output nonlinearity: callers clamp to [-1, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels: int) -> nn.GroupNorm:
    # eps=1e-6 (not PyTorch's 1e-5) is what the released weights were trained with.
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest ×2 then a 3×3 conv. (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """3×3 stride-2 conv after padding one zero row/column at the bottom/right only (LDM's
    asymmetric padding, which the weights depend on). (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """x + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))) with a 1×1 `nin_shortcut` on the
    skip path only when the channel count changes (else no key at all)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        # In place, as the official code: no norm or conv needs its own output for backward, and
        # every fresh full-resolution activation costs an allocation (the decode's largest cost
        # on a CPU, docs/sampling-speed.md).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, C channels, one fused 1×1 `qkv` conv
    (VAR's layout; LDM/taming use separate q/k/v convs, hence different keys)."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.scale = channels ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, N)
        # Explicit bmm + softmax in the official order of operations (scores scaled after the
        # product) keeps the encoder output within ~1e-6 of the reference, well under the
        # nearest-code margins the tokens depend on.
        w = torch.bmm(q.transpose(1, 2).contiguous(), k).mul_(self.scale)  # (B, Nq, Nk)
        w = F.softmax(w, dim=2)
        h = torch.bmm(v, w.transpose(1, 2).contiguous())  # (B, C, Nq)
        return x + self.proj_out(h.reshape(B, C, H, W))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] → latent (B, z_channels, H/d, W/d), d = 2^(len(ch_mult)−1)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        c_in = ch
        for lvl, mult in enumerate(ch_mult):
            c_out = ch * mult
            level = nn.Module()  # plain container: keys read down.{lvl}.block/attn/downsample
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lvl == self.num_levels - 1:  # attention only at the coarsest level
                    level.attn.append(AttnBlock(c_in))
            if lvl != self.num_levels - 1:
                level.downsample = Downsample2x(c_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c_in, c_in, dropout)
        self.mid.attn_1 = AttnBlock(c_in)
        self.mid.block_2 = ResnetBlock(c_in, c_in, dropout)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl, level in enumerate(self.down):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if lvl != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, 3, h·d, w·d), unclamped."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        self.num_levels = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(c_in, c_in, dropout)
        self.mid.attn_1 = AttnBlock(c_in)
        self.mid.block_2 = ResnetBlock(c_in, c_in, dropout)

        levels = []
        for lvl in reversed(range(self.num_levels)):  # built coarse → fine, like they run
            c_out = ch * ch_mult[lvl]
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):  # one more block per level than the encoder
                level.block.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lvl == self.num_levels - 1:
                    level.attn.append(AttnBlock(c_in))
            if lvl != 0:
                level.upsample = Upsample2x(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # stored fine → coarse: up.0 is the full-resolution level

        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(range(self.num_levels)):
            level = self.up[lvl]
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if lvl != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
