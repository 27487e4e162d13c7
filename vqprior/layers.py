"""Causal primitives of PixelSNAIL: weight-normed convolutions, shifted (causal) convolutions, gated residual blocks.

Every layer here has a fixed, documented input window, which the cached sampler (``cached.py``) relies on:

* ``DownRightShiftedConv2d`` (k x k): output (r, c) reads rows r-k+1..r, columns c-k+1..c of its input.
* ``DownShiftedConv2d`` (1 x w, w odd): output (r, c) reads row r, columns c-(w-1)/2 .. c+(w-1)/2.
* ``down_shift`` / ``right_shift`` move a map one row down / one column right, padding with zeros.
* 1x1 convolutions (``WNConv2d`` with kernel 1) read position (r, c) only.

Weight normalisation (Salimans & Kingma) is explicit: ``weight_v``, ``weight_g`` and ``bias`` are the parameters
and ``weight()`` computes ``g * v / |v|``. ``data_dependent_init`` sets g and b from one batch with forward hooks,
so ``forward`` itself never mutates parameters.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .activation import elu


class WNConv2d(nn.Module):
    """A weight-normalised 2D convolution without padding (callers pad explicitly, which keeps causality visible).

    ``init_scale`` is the target output scale of data-dependent init (0.1 for the last conv of a gated block).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] | int = 1,
                 init_scale: float = 1.0, bias: bool = True):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.kernel_size = (kh, kw)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.init_scale = init_scale
        self.weight_v = nn.Parameter(torch.randn(out_channels, in_channels, kh, kw) * 0.05)
        self.weight_g = nn.Parameter(self.weight_v.detach().flatten(1).norm(dim=1).clone())
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def weight(self) -> torch.Tensor:
        norm = self.weight_v.flatten(1).norm(dim=1).clamp_min(1e-12)
        return self.weight_v * (self.weight_g / norm).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


class Dropout(nn.Module):
    """Inverted dropout: each element is zeroed independently with probability ``p``, survivors scaled by 1/(1-p).

    The same distribution as ``nn.Dropout``, but the mask comes from ``torch.rand`` (always float32, so the rate is
    exact under bf16 autocast too): on CPU ``aten::bernoulli_`` costs ~4x ``torch.rand`` of the same size (26 vs
    6 ms for (8, 256, 32, 32) here) and was the largest single item of a paper-cifar10 training step's profile.
    Under ``torch.compile`` the comparison and the scaling fuse with the neighbouring ops.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Memory: the backward keeps a 1-byte mask of the dropped elements (what ``masked_fill_`` saves), not a float
        # mask of x's size. The scale is rounded to x's dtype first, so kept values are exactly what x * (a float
        # mask of 0 and 1/(1-p)) gave; the product keeps x's memory layout.
        drop = torch.rand(x.shape, device=x.device) < self.p
        scale = torch.ones((), device=x.device).div_(1.0 - self.p).to(x.dtype)
        return (x * scale).masked_fill_(drop, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift a (B, C, H, W) map one row down; row 0 becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift a (B, C, H, W) map one column right; column 0 becomes zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class DownRightShiftedConv2d(nn.Module):
    """k x k convolution whose output at (r, c) sees rows r-k+1..r and columns c-k+1..c (zero outside the image)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, init_scale: float = 1.0):
        super().__init__()
        self.k = kernel_size
        self.conv = WNConv2d(in_channels, out_channels, (kernel_size, kernel_size), init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.k - 1, 0, self.k - 1, 0)))


class DownShiftedConv2d(nn.Module):
    """1 x w convolution (w odd) whose output at (r, c) sees row r, columns c-(w-1)/2 .. c+(w-1)/2."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 3):
        super().__init__()
        self.half = (width - 1) // 2
        self.conv = WNConv2d(in_channels, out_channels, (1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.half, self.half, 0, 0)))


class CausalStem(nn.Module):
    """The first layer: never sees the current position.

    down_shift(1x3 down-shifted conv) reads row r-1, columns c-1..c+1; right_shift(2x1 down-right conv) reads
    rows r-1..r, column c-1. Their sum therefore depends only on strictly earlier raster positions.
    """

    def __init__(self, in_channels: int, filters: int):
        super().__init__()
        self.down = DownShiftedConv2d(in_channels, filters, width=3)
        self.down_right = WNConv2d(in_channels, filters, (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return down_shift(self.down(x)) + right_shift(self.down_right(F.pad(x, (0, 0, 1, 0))))


class GatedResBlock(nn.Module):
    """PixelCNN++ gated residual block: x + a * sigmoid(b), [a, b] = conv2(dropout(elu(conv1(elu(x)) + aux))).

    ``kind`` is ``"down_right"`` (k x k causal conv) or ``"nin"`` (1x1). Optional inputs:
    ``aux`` (B, aux_channels, H, W) added after conv1 through a 1x1 conv (the attention result);
    ``class_bias`` (B, 2F) and ``cond`` (B, cond_channels, H, W) added to conv2's output (conditioning).
    """

    def __init__(self, channels: int, kind: str = "down_right", kernel_size: int = 2, dropout: float = 0.0,
                 aux_channels: int = 0, cond_channels: int = 0, num_classes: int = 0):
        super().__init__()
        self.kind = kind
        if kind == "down_right":
            self.conv1 = DownRightShiftedConv2d(channels, channels, kernel_size)
            self.conv2 = DownRightShiftedConv2d(channels, 2 * channels, kernel_size, init_scale=0.1)
        elif kind == "nin":
            self.conv1 = WNConv2d(channels, channels, 1)
            self.conv2 = WNConv2d(channels, 2 * channels, 1, init_scale=0.1)
        else:
            raise ValueError(f"unknown gated block kind {kind!r}")
        self.aux = WNConv2d(aux_channels, channels, 1) if aux_channels else None
        self.cond = WNConv2d(cond_channels, 2 * channels, 1, bias=False) if cond_channels else None
        self.class_embedding = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)  # start unconditional; the label learns its bias
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(elu(x))
        if self.aux is not None:
            h = h + self.aux(elu(aux))
        h = self.conv2(self.dropout(elu(h)))
        h = h + self.condition_bias(label, cond)
        # a * sigmoid(b) for [a, b] = h, as one op: its backward keeps h alone (recomputing the sigmoid), where
        # a * torch.sigmoid(b) kept h and sigmoid(b), a third more memory per gated block.
        return x + F.glu(h, 1)

    def condition_bias(self, label: torch.Tensor | None, cond: torch.Tensor | None):
        """The conditioning added to conv2's output: (B, 2F, 1, 1) class bias plus (B, 2F, H, W) map term, or 0."""
        out = 0.0
        if self.class_embedding is not None:
            if label is None:
                raise ValueError("this model is class-conditional: a label is required")
            out = out + self.class_embedding(label)[:, :, None, None]
        if self.cond is not None:
            if cond is None:
                raise ValueError("this model is conditioned on a code map: condition codes are required")
            out = out + self.cond(cond)
        return out


@contextlib.contextmanager
def _init_hooks(model: nn.Module):
    """Install forward hooks that give each WNConv2d zero-mean, init_scale-std outputs on the current batch."""

    def hook(module: WNConv2d, inputs, output):
        # Before the hook runs, g = |v| and b = 0, so ``output`` is the plain conv with direction v.
        with torch.no_grad():
            mean = output.mean((0, 2, 3))
            std = output.std((0, 2, 3))
            # A constant output (e.g. a padding-only window) has no scale to measure: leave it unscaled.
            scale = torch.where(std > 1e-6, module.init_scale / (std + 1e-8), torch.ones_like(std))
            module.weight_g.mul_(scale)
            if module.bias is not None:
                module.bias.copy_(-mean * scale)
            return F.conv2d(inputs[0], module.weight(), module.bias)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, WNConv2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def data_dependent_init(model: nn.Module, *args, **kwargs) -> None:
    """Weight-norm data-dependent init: one forward pass on a batch, layer by layer in execution order."""
    was_training = model.training
    model.eval()  # no dropout while measuring statistics
    with torch.no_grad(), _init_hooks(model):
        for m in model.modules():
            if isinstance(m, WNConv2d):
                m.weight_g.copy_(m.weight_v.flatten(1).norm(dim=1))  # g = |v|: weight() == v before scaling
                if m.bias is not None:
                    m.bias.zero_()
        model(*args, **kwargs)
    model.train(was_training)
