"""Per-layer state of the exact cached evaluation (``vqprior.sampling.cached``): each PixelSNAIL layer at one raster
position.

A k x k gated block keeps its two (channels-last, zero-padded) input maps filled up to the current position and
contracts the causal window with its weight in one matmul; a 1x1 gated block needs no state; an attention step
keeps the keys and values of the positions filled so far. Each step class has a dynamic method (Python-integer
positions, shapes that change with the position) and a static one (index tensors and a device-tensor position:
the same shapes at every position, what ``torch.compile`` needs); ``CachedSampler`` drives them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vqprior.models.activation import elu
from vqprior.models.layers import GatedResBlock, WNConv2d


def conv_matrix(conv: WNConv2d) -> torch.Tensor:
    """A conv's weight-normed weight as a (kh*kw*in, out) matrix, rows in channels-last window order (kh, kw, in)."""
    w = conv.weight().detach()
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()


def fill_prefix(buffer: torch.Tensor, top: int, left: int, fmap: torch.Tensor, start: int) -> None:
    """Copy the positions < start of a (B, C, H, W) map into a channels-last buffer padded by ``top``/``left``."""
    W = fmap.shape[3]
    rows, cols = divmod(start, W)
    src = fmap.permute(0, 2, 3, 1)
    buffer[:, top:top + rows, left:left + W] = src[:, :rows]
    if cols:
        buffer[:, top + rows, left:left + cols] = src[:, rows, :cols]


def at_position(table: torch.Tensor, p: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``table`` at the position held by the 0-d device tensor ``p`` along ``dim`` (that dimension dropped). Not
    ``table[p]``: torch.compile in torch 2.13 (not 2.14) reads a 0-d index as an int and guards on ``p.item()``,
    which recompiled the static step at every position (docs/gpu.md, "Torch versions")."""
    return table.index_select(dim, p.view(1)).squeeze(dim)


class NinGatedStep:
    """A 1x1 GatedResBlock at one position: (B, D) -> (B, D); ``aux`` (B, A) enters conv1 through its 1x1 conv."""

    def __init__(self, block: GatedResBlock):
        self.w1, self.b1 = conv_matrix(block.conv1), block.conv1.bias.detach()
        if block.aux is not None:  # elu(x) W1 + elu(aux) Waux as one matmul over [x, aux]
            self.w1 = torch.cat([self.w1, conv_matrix(block.aux)], 0)
            self.b1 = self.b1 + block.aux.bias.detach()
        self.w2, self.b2 = conv_matrix(block.conv2), block.conv2.bias.detach()

    def __call__(self, x, aux=None, bias2=None):
        h = torch.addmm(self.b1, elu(x if aux is None else torch.cat([x, aux], 1)), self.w1)
        return x + F.glu(torch.addmm(self.b2 if bias2 is None else bias2, elu(h), self.w2), 1)  # a * sigmoid(b)


class DownRightGatedStep:
    """A k x k down-right GatedResBlock at one position, keeping the two maps its convs read (elu already applied)."""

    def __init__(self, block: GatedResBlock, batch: int, height: int, width: int):
        self.k = k = block.conv1.k
        self.w1, self.b1 = conv_matrix(block.conv1.conv), block.conv1.conv.bias.detach()
        self.w2 = conv_matrix(block.conv2.conv)  # conv2's bias is part of the per-step conditioned bias
        shape = (batch, height + k - 1, width + k - 1, self.w1.shape[1])  # zero rows on top, zero columns left
        # Allocated flat (B, rows * columns, C) for the static path's index_select / index_copy_; viewed 4-D.
        self.in_flat = self.w1.new_zeros(batch, shape[1] * shape[2], shape[3])  # elu(x): conv1's input
        self.mid_flat = self.w1.new_zeros(batch, shape[1] * shape[2], shape[3])  # elu(conv1 output): conv2's input
        self.in_map, self.mid_map = self.in_flat.view(shape), self.mid_flat.view(shape)  # (dropout is off in eval)

    def __call__(self, x, r: int, c: int, bias2):
        k, B = self.k, x.shape[0]
        self.in_map[:, r + k - 1, c + k - 1] = elu(x)
        h = torch.addmm(self.b1, self.in_map[:, r:r + k, c:c + k].reshape(B, -1), self.w1)
        self.mid_map[:, r + k - 1, c + k - 1] = elu(h)
        return x + F.glu(torch.addmm(bias2, self.mid_map[:, r:r + k, c:c + k].reshape(B, -1), self.w2), 1)

    def static(self, x, window: torch.Tensor, write: torch.Tensor, bias2):
        """The same at the position whose k*k window and own cell in the flat maps are ``window`` (k*k,) and
        ``write`` (1,) (index tensors): the window rows come out in the (kh, kw, channel) order of the matrices."""
        B = x.shape[0]
        self.in_flat.index_copy_(1, write, elu(x).unsqueeze(1).to(self.in_flat.dtype))
        h = torch.addmm(self.b1, self.in_flat.index_select(1, window).reshape(B, -1), self.w1)
        self.mid_flat.index_copy_(1, write, elu(h).unsqueeze(1).to(self.mid_flat.dtype))
        return x + F.glu(torch.addmm(bias2, self.mid_flat.index_select(1, window).reshape(B, -1), self.w2), 1)


class AttentionStep:
    """Causal self-attention at one position over cached keys/values of the earlier positions."""

    def __init__(self, attn, batch: int, length: int, bg_rows: torch.Tensor):
        self.heads, self.key_channels = n, dk = attn.heads, attn.key_channels
        self.q_block, self.kv_block = NinGatedStep(attn.q_block), NinGatedStep(attn.kv_block)
        scale = 1.0 / math.sqrt(dk // n)  # SDPA's default: 1 / sqrt(per-head key size); folded into the query
        self.q_w, self.q_b = conv_matrix(attn.q_proj) * scale, attn.q_proj.bias.detach() * scale
        self.kv_w, self.kv_b = conv_matrix(attn.kv_proj), attn.kv_proj.bias.detach()
        like = self.kv_w
        self.keys_t = like.new_zeros(batch, n, dk // n, length)  # transposed: ready for q @ k^T
        self.values = like.new_zeros(batch, n, length, attn.value_channels // n)
        self.zero = like.new_zeros(batch, attn.value_channels)  # position 0 attends to nothing
        self.bg = bg_rows.unsqueeze(1).expand(length, batch, 2)  # (L, B, 2)
        self.block_out = None  # block output at the current position, waiting for that position's raw input
        self.block_out_buffer = like.new_zeros(batch, attn.q_proj.in_channels - 2)  # static path (q_in = filters + 2)
        self.before = torch.arange(length, device=like.device)  # static path: key j is visible at p when j < p

    def attend(self, h, p: int):
        self.block_out = h
        if p == 0:
            return self.zero
        B = h.shape[0]
        q = torch.addmm(self.q_b, self.q_block(torch.cat([h, self.bg[p]], 1)), self.q_w)
        scores = torch.matmul(q.view(B, self.heads, 1, -1), self.keys_t[..., :p])  # (B, n, 1, p)
        out = torch.matmul(torch.softmax(scores, -1), self.values[:, :, :p])  # (B, n, 1, value / n)
        return out.reshape(B, -1)

    def attend_static(self, h, p: torch.Tensor):
        """``attend`` at the position held by the 0-d tensor ``p``, over all L cached keys with those at positions
        >= p masked: the same shapes at every position. exp(-inf) = 0, so the masked keys add exact zeros."""
        self.block_out_buffer.copy_(h)
        B = h.shape[0]
        q = torch.addmm(self.q_b, self.q_block(torch.cat([h, at_position(self.bg, p)], 1)), self.q_w)
        scores = torch.matmul(q.view(B, self.heads, 1, -1), self.keys_t)  # (B, n, 1, L)
        scores = scores.masked_fill(self.before >= p, float("-inf"))
        out = torch.matmul(torch.softmax(scores, -1), self.values).reshape(B, -1)  # (B, value)
        return torch.where(p > 0, out, self.zero)  # position 0 (an all-masked row, NaN above) attends to nothing

    def append_static(self, raw, p: torch.Tensor):
        """``append`` at the position held by the 0-d tensor ``p``."""
        B = raw.shape[0]
        kv = torch.addmm(self.kv_b, self.kv_block(torch.cat([raw, self.block_out_buffer, at_position(self.bg, p)], 1)),
                         self.kv_w)
        at = p.view(1)
        self.keys_t.index_copy_(3, at, kv[:, :self.key_channels].reshape(B, self.heads, -1, 1).to(self.keys_t.dtype))
        self.values.index_copy_(2, at, kv[:, self.key_channels:].reshape(B, self.heads, 1, -1).to(self.values.dtype))

    def append(self, raw, p: int):
        B = raw.shape[0]
        kv = torch.addmm(self.kv_b, self.kv_block(torch.cat([raw, self.block_out, self.bg[p]], 1)), self.kv_w)
        self.keys_t[..., p] = kv[:, :self.key_channels].view(B, self.heads, -1)
        self.values[:, :, p] = kv[:, self.key_channels:].view(B, self.heads, -1)

    def fill(self, kv_map, start: int):
        """Keys/values of positions < start from kv_proj's (B, key + value, H, W) output."""
        B = kv_map.shape[0]
        kv = kv_map.flatten(2)[:, :, :start]
        self.keys_t[..., :start] = kv[:, :self.key_channels].reshape(B, self.heads, -1, start)
        self.values[:, :, :start] = kv[:, self.key_channels:].reshape(B, self.heads, -1, start).transpose(2, 3)
