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
import math

import torch
import torch.nn.functional as F
from torch import nn

from vqprior.errors import InputError
from vqprior.models.activation import elu


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of a contiguous (NCHW) map as one batched matmul: weight (O, C) times each image's (C, H*W).

    The same arithmetic as ``F.conv2d`` (up to float summation order). Why, on the CPU: oneDNN runs small-channel
    1x1 convolutions in NCHW below its matmul speed (the gated 1x1 blocks around attention).
    Channels-last maps keep ``F.conv2d``, whose 1x1 case is already one matmul over (B*H*W, C).
    """
    B, C, H, W = x.shape
    w = weight.flatten(1).expand(B, -1, -1)
    x = x.view(B, C, H * W)
    out = torch.bmm(w, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1).expand(B, -1, H * W), w, x)
    return out.view(B, -1, H, W)


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
        if self.kernel_size == (1, 1) and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous():
            return pointwise(x, self.weight(), self.bias)
        return F.conv2d(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


def drop_mask(shape, p: float, device=None, kept: bool = False) -> torch.Tensor:
    """A bool mask of ``shape``, each element True (dropped) independently with probability ``p``; ``kept=True``
    gives its complement (True where kept) from the same draw and comparison, not a second pass over the mask.

    On the CPU from 32 random bits per element: one ``random_`` call fills an int64 with 64 uniform bits, read as two
    int32, each compared with a threshold, so the rate is ``p`` rounded to a multiple of 2^-32 (``torch.rand < p``
    rounds it to 2^-24). Why: the CPU generator costs the same per call whatever it returns, so half the calls of
    ``torch.rand(n) < p`` halve the mask's cost, a visible share of a training step with dropout. Elsewhere (GPUs, and
    under ``torch.compile``, which fuses it) the plain ``torch.rand < p``.
    """
    compare = torch.ge if kept else torch.lt  # kept: not below the threshold, the same draw's complement
    if torch.device(device or "cpu").type != "cpu" or torch.compiler.is_compiling():
        return compare(torch.rand(shape, device=device), p)
    threshold = round(p * (1 << 32)) - (1 << 31)  # int32 values below it: round(p * 2^32) of the 2^32 equally likely
    if threshold >= 1 << 31:  # p rounds to 1: no int32 threshold expresses it
        return compare(torch.rand(shape, device=device), p)
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return compare(bits.view(torch.int32)[:n], threshold).view(shape)


class Dropout(nn.Module):
    """Inverted dropout: each element is zeroed independently with probability ``p``, survivors scaled by 1/(1-p).

    The same distribution as ``nn.Dropout``, but the mask comes from ``drop_mask`` (above), never from
    ``aten::bernoulli_``, which on the CPU costs several times ``torch.rand`` of the same size and tops the profile
    of a wide model's training step.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise InputError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Memory: the backward keeps the 1-byte mask of kept elements (all that x * mask saves when the mask needs
        # no gradient), not a float mask of x's size. Speed: the mask is laid out as x is (channels-last too; its
        # elements are independent, so drawing them in x's memory order is the same distribution), and a product
        # with it is a plain elementwise pass, where masked_fill_ cost 2.4x (channels-last 2.9x) forward and
        # backward here. The scale is rounded to x's dtype first, so kept values are exactly what x * (a float
        # mask of 0 and 1/(1-p)) gave.
        keep = drop_mask(x.shape, self.p, x.device, kept=True)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            keep = keep.view(-1).as_strided(x.shape, x.stride())
        scale = torch.ones((), device=x.device).div_(1.0 - self.p).to(x.dtype)
        return x.mul(keep).mul_(scale)

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


class _Gate(torch.autograd.Function):
    """a * sigmoid(b) for [a, b] = h.chunk(2, 1), keeping h alone for the backward (the sigmoid is recomputed)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, 1)
        ctx.save_for_backward(h)
        return torch.sigmoid(b).mul_(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, 1)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, 1)
        s = torch.sigmoid(b)
        torch.mul(grad, s, out=grad_a)  # d/da = sigmoid(b)
        torch.mul(grad_a, a, out=grad_b).mul_(s.neg_().add_(1))  # d/db = a * sigmoid(b) * (1 - sigmoid(b))
        return grad_h


def gate(h: torch.Tensor) -> torch.Tensor:
    """The gated blocks' output a * sigmoid(b) for [a, b] = h.chunk(2, 1), keeping only h for the backward pass
    (``a * torch.sigmoid(b)`` also kept sigmoid(b): a third more memory per gated block). ``F.glu`` is that op, but
    on channels-last maps its CPU kernel is several times slower than the two-op form, so those go through
    ``_Gate``, the same arithmetic in layout-preserving ops. Not under ``torch.compile``: inductor fuses ``F.glu`` and
    chooses what to keep itself, and some torch versions' dynamo break the graph on ``_Gate``'s ``out=`` into a
    channels-last view (the blocks would then run eagerly)."""
    return F.glu(h, 1) if h.is_contiguous() or torch.compiler.is_compiling() else _Gate.apply(h)


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
        bias = self.condition_bias(label, cond)
        if bias is not None:  # unconditioned: no pass over h adding a zero
            h = h + bias
        return x + gate(h)

    def condition_bias(self, label: torch.Tensor | None, cond: torch.Tensor | None):
        """The conditioning added to conv2's output: (B, 2F, 1, 1) class bias plus (B, 2F, H, W) map term, or None
        for an unconditioned block."""
        if self.class_embedding is None and self.cond is None:
            return None
        out = 0.0
        if self.class_embedding is not None:
            if label is None:
                raise InputError("this model is class-conditional: a label is required")
            out = out + self.class_embedding(label)[:, :, None, None]
        if self.cond is not None:
            if cond is None:
                raise InputError("this model is conditioned on a code map: condition codes are required")
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
