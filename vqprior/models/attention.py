"""Causal self-attention over raster positions (PixelSNAIL's attention step).

Keys and values are built from concat[raw input, block output, background]; queries from concat[block output,
background]. The raw input in the keys/values is what removes the blind spots of the convolution stack: the
position just before p (e.g. the last one of the previous row) is always reachable through attention.

Position p attends to positions strictly before p: queries 1..L-1 run against keys/values 0..L-2 under an ordinary
causal mask (``is_causal=True``, so the fused SDPA kernels apply). Position 0 has nothing to attend to and gets a
zero vector; no softmax is ever taken over an all-masked row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqprior.models.layers import GatedResBlock, WNConv2d


def background(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """The two background channels (1, 2, H, W): (i - H/2)/H and (j - W/2)/W."""
    i = (torch.arange(height, device=device, dtype=dtype) - height / 2) / height
    j = (torch.arange(width, device=device, dtype=dtype) - width / 2) / width
    return torch.stack([i[:, None].expand(height, width), j[None, :].expand(height, width)])[None]


class CausalSelfAttention(nn.Module):
    """PixelSNAIL attention: gated 1x1 blocks, projections to keys/values/queries, strictly causal softmax."""

    def __init__(self, raw_channels: int, filters: int, key_channels: int, value_channels: int, heads: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        kv_in = raw_channels + filters + 2
        q_in = filters + 2
        self.heads = heads
        self.key_channels, self.value_channels = key_channels, value_channels
        self.kv_block = GatedResBlock(kv_in, kind="nin", dropout=dropout)
        self.kv_proj = WNConv2d(kv_in, key_channels + value_channels, 1)
        self.q_block = GatedResBlock(q_in, kind="nin", dropout=dropout)
        self.q_proj = WNConv2d(q_in, key_channels, 1)

    def keys_values(self, raw: torch.Tensor, h: torch.Tensor, bg: torch.Tensor):
        """(B, key, H, W), (B, value, H, W) from the raw input, block output and background."""
        kv = self.kv_proj(self.kv_block(torch.cat([raw, h, bg.expand(h.shape[0], -1, -1, -1)], 1)))
        return kv.split([self.key_channels, self.value_channels], 1)

    def queries(self, h: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """(B, key, H, W) queries from the block output and background."""
        return self.q_proj(self.q_block(torch.cat([h, bg.expand(h.shape[0], -1, -1, -1)], 1)))

    def forward(self, raw: torch.Tensor, h: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        k, v = self.keys_values(raw, h, bg)
        return self.attend(self.queries(h, bg), k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, value, H, W): each position's causal softmax attention over the positions before it, from (B, key,
        H, W) queries and keys and (B, value, H, W) values."""
        B, _, H, W = q.shape
        L, n = H * W, self.heads

        def to_heads(t):  # (B, C, H, W) -> (B, heads, L, C / heads)
            return t.flatten(2).transpose(1, 2).reshape(B, L, n, -1).transpose(1, 2)

        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        scale = q.shape[-1] ** -0.5
        out = v.new_zeros(B, n, L, v.shape[-1])  # position 0 attends to nothing: a zero vector
        if L > 1:
            # Query i >= 1 attends keys 0..i-1: queries 1..L-1 against keys/values 0..L-2 under a plain causal mask,
            # which PyTorch's fused CPU/GPU kernels support (and they skip the masked half). The fused CPU kernel
            # also needs equal head sizes (zero-padding q and k leaves every score unchanged) and contiguous inputs:
            # with several heads of equal q and v sizes the pad is empty and returns the strided head view, which
            # would silently send SDPA to the math kernel (L x L scores) instead.
            pad = (0, max(0, v.shape[-1] - q.shape[-1]))
            out[:, :, 1:] = F.scaled_dot_product_attention(
                F.pad(q[:, :, 1:], pad).contiguous(), F.pad(k[:, :, :-1], pad).contiguous(),
                v[:, :, :-1].contiguous(), is_causal=True, scale=scale)
        out = out.transpose(1, 2).reshape(B, L, self.value_channels)
        return out.transpose(1, 2).reshape(B, self.value_channels, H, W)
