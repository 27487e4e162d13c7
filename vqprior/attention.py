"""Causal self-attention over raster positions (PixelSNAIL's attention step).

Keys and values are built from concat[raw input, block output, background]; queries from concat[block output,
background]. The raw input in the keys/values is what removes the blind spots of the convolution stack: the
position just before p (e.g. the last one of the previous row) is always reachable through attention.

Position p attends to positions strictly before p. Position 0 has nothing to attend to and gets a zero vector:
SDPA is given a mask whose row 0 admits the diagonal (so no softmax over an all-masked row produces NaN), and that
row's output is then multiplied by zero, which also zeroes its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GatedResBlock, WNConv2d


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) boolean mask: query i may attend key j iff j < i; row 0 admits j == 0 (its output is discarded)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril(-1)
    mask[0, 0] = True
    return mask


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
        self._mask_cache: dict[tuple[int, str], torch.Tensor] = {}

    def keys_values(self, raw: torch.Tensor, h: torch.Tensor, bg: torch.Tensor):
        """(B, key, H, W), (B, value, H, W) from the raw input, block output and background."""
        kv = self.kv_proj(self.kv_block(torch.cat([raw, h, bg.expand(h.shape[0], -1, -1, -1)], 1)))
        return kv.split([self.key_channels, self.value_channels], 1)

    def queries(self, h: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """(B, key, H, W) queries from the block output and background."""
        return self.q_proj(self.q_block(torch.cat([h, bg.expand(h.shape[0], -1, -1, -1)], 1)))

    def _mask(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = causal_mask(length, device)
        return self._mask_cache[key]

    def forward(self, raw: torch.Tensor, h: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        B, _, H, W = h.shape
        L, n = H * W, self.heads
        k, v = self.keys_values(raw, h, bg)
        q = self.queries(h, bg)

        def to_heads(t):  # (B, C, H, W) -> (B, heads, L, C / heads)
            return t.flatten(2).transpose(1, 2).reshape(B, L, n, -1).transpose(1, 2)

        q, k, v = to_heads(q), to_heads(k), to_heads(v)
        scale = q.shape[-1] ** -0.5
        if q.shape[-1] < v.shape[-1] <= 4 * q.shape[-1]:
            # PyTorch's fused CPU kernel needs equal query/key and value head sizes, else it falls back to the
            # math path (2x slower here). Zero-padding q and k leaves every score, and so the result, unchanged.
            pad = (0, v.shape[-1] - q.shape[-1])
            q, k = F.pad(q, pad), F.pad(k, pad)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(L, h.device), scale=scale)
        out = out.transpose(1, 2).reshape(B, L, self.value_channels)
        first = torch.ones(L, 1, dtype=out.dtype, device=out.device)
        first[0] = 0.0  # position 0 attends to nothing
        out = out * first
        return out.transpose(1, 2).reshape(B, self.value_channels, H, W)
