"""PixelSNAIL (Chen et al., 2018): a causal stem, blocks of gated residual convolutions each followed by causal
self-attention, and a head chosen by the config (pixels: logistic mixture; codes: categorical).

The output at raster position p depends only on inputs at positions before p. Conditioning (a class label and/or a
coarser code map) enters every gated block of the main stream; the condition path is computed once per forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqprior.config import ModelConfig
from vqprior.errors import InputError
from vqprior.models.activation import elu
from vqprior.models.attention import CausalSelfAttention, background
from vqprior.models.distributions import uint8_to_unit
from vqprior.models.heads import CategoricalHead, LogisticMixtureHead
from vqprior.models.layers import CausalStem, GatedResBlock, WNConv2d


class ConditionStack(nn.Module):
    """Non-causal residual 3x3 conv stack over a coarser code map, resized (nearest) to the prior's grid."""

    def __init__(self, num_codes: int, channels: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, channels)
        self.convs = nn.ModuleList(WNConv2d(channels, channels, 3) for _ in range(layers))

    def forward(self, codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, C, h, w)
        for conv in self.convs:
            x = x + conv(F.pad(elu(x), (1, 1, 1, 1)))
        return F.interpolate(x, size=size, mode="nearest")


def _run(recompute: bool, fn, *args):
    """``fn(*args)``, checkpointed when ``recompute``: only its inputs are kept for the backward pass, where it runs
    again (with the RNG state it first ran with, so dropout masks and gradients are the same)."""
    return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)


class PixelSNAILBlock(nn.Module):
    """``res_blocks`` causal gated residual blocks, then (optionally) one attention step."""

    def __init__(self, c: ModelConfig, raw_channels: int, cond_channels: int):
        super().__init__()
        gated = dict(dropout=c.dropout, cond_channels=cond_channels, num_classes=c.class_rows)
        self.res = nn.ModuleList(GatedResBlock(c.filters, "down_right", c.kernel_size, **gated)
                                 for _ in range(c.res_blocks))
        if c.attention:
            self.attn = CausalSelfAttention(raw_channels, c.filters, c.key_channels, c.value_channels, c.attn_heads,
                                            c.dropout)
            self.out = GatedResBlock(c.filters, "nin", aux_channels=c.value_channels, **gated)
        else:
            self.attn = self.out = None

    def forward(self, h, raw, bg, label=None, cond=None, recompute: bool = False):
        """``recompute``: keep only the input of each gated block and of the attention step for the backward pass
        and recompute the rest there (activation checkpointing at the finest step that still pays: one gated
        block's activations are alive at a time instead of a whole PixelSNAIL block's)."""
        for block in self.res:
            h = _run(recompute, block, h, None, label, cond)
        if self.attn is not None:
            h = _run(recompute, self.attend, h, raw, bg, label, cond, recompute)
        return h

    def attend(self, h, raw, bg, label=None, cond=None, recompute: bool = False):
        """The attention step: causal attention over the block output, into a 1x1 gated block as auxiliary input.

        With ``recompute`` (inside the block's own checkpoint) its four parts are checkpointed again: recomputing
        the whole step at once held all of them (the 514-channel key/value block, the query block, the attention
        and the output block: 150 MB per 64x64 map at 256 filters, the largest recomputed unit by far); nested,
        one part is recomputed at a time, for one more forward pass of the attention step."""
        k, v = _run(recompute, self.attn.keys_values, raw, h, bg)
        q = _run(recompute, self.attn.queries, h, bg)
        return _run(recompute, self.out, h, _run(recompute, self.attn.attend, q, k, v), label, cond)


class PixelSNAIL(nn.Module):
    """PixelSNAIL over images (``head="pixels"``) or VQ-VAE code maps (``head="codes"``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        if c.head == "pixels":
            self.embedding = None
            raw_channels = c.channels
            self.head = LogisticMixtureHead(c.filters, c.channels, c.mixtures)
        else:
            # A learned embedding of the code index: the same as a one-hot input times a matrix, but cheaper.
            self.embedding = nn.Embedding(c.num_codes, c.embed_dim)
            raw_channels = c.embed_dim
            self.head = CategoricalHead(c.filters, c.num_codes)
        self.condition = ConditionStack(c.cond_num_codes, c.cond_channels, c.cond_layers) if c.cond_num_codes else None
        cond_channels = c.cond_channels if c.cond_num_codes else 0
        self.stem = CausalStem(raw_channels + 1, c.filters)  # +1: a channel of ones tells image from padding
        self.blocks = nn.ModuleList(PixelSNAILBlock(c, raw_channels, cond_channels) for _ in range(c.blocks))
        # Training-time memory option (not architecture): recompute each gated block and attention step in the
        # backward pass instead of keeping their activations. The RNG state is restored for the recomputation, so
        # dropout masks and gradients are the same as without it.
        self.checkpoint_activations = False

    # ---- inputs -------------------------------------------------------------------------------------------------
    def check_inputs(self, x: torch.Tensor, label=None, condition=None) -> None:
        """Raise ValueError with a one-line message when inputs do not fit this model."""
        c = self.config
        if c.head == "pixels":
            if x.dim() != 4 or x.shape[1] != c.channels:
                raise InputError(f"expected images of shape (B, {c.channels}, H, W), got {tuple(x.shape)}")
        else:
            if x.dim() != 3:
                raise InputError(f"expected codes of shape (B, H, W), got {tuple(x.shape)}")
            if x.dtype.is_floating_point:
                raise InputError("codes must be an integer tensor")
            if x.numel() and (x.min() < 0 or x.max() >= c.num_codes):
                raise InputError(f"codes outside the codebook: values must be in [0, {c.num_codes - 1}], "
                                 f"got [{int(x.min())}, {int(x.max())}]")
        if c.num_classes:
            if label is None:
                raise InputError("this model is class-conditional: pass a label")
            label = torch.as_tensor(label)
            if label.numel() and (label.min() < 0 or label.max() >= c.class_rows):
                null = f" or the null class {c.num_classes}" if c.null_class else ""
                raise InputError(f"label outside [0, {c.num_classes - 1}]{null}")
        if c.cond_num_codes:
            if condition is None:
                raise InputError("this is a bottom (or middle) prior conditioned on top codes (the codes of the level "
                                 "above): pass them")
            if condition.dim() != 3 or tuple(condition.shape[1:]) != (c.cond_height, c.cond_width):
                raise InputError(f"top codes must have shape (B, {c.cond_height}, {c.cond_width}), "
                                 f"got {tuple(condition.shape)}")
            if condition.min() < 0 or condition.max() >= c.cond_num_codes:
                raise InputError(f"top codes outside the codebook [0, {c.cond_num_codes - 1}]")

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The raw input map (B, Cr, H, W): pixels scaled to [-1, 1] (uint8 or already-scaled float), or code
        embeddings. This is what the stem sees and what enters the attention keys/values."""
        if self.embedding is None:
            if x.dtype == torch.uint8:
                return uint8_to_unit(x, self.stem.down.conv.weight_v.dtype)
            return x
        return self.embedding(x).permute(0, 3, 1, 2)

    def condition_features(self, condition: torch.Tensor | None, size: tuple[int, int]):
        """The code-map condition (B, cond_channels, H, W) or None: computed once per forward / per sample."""
        if self.condition is None:
            return None
        return self.condition(condition, size)

    def memory_format(self) -> torch.memory_format:
        """Speed: wide models run with channels-last (NHWC) activations, where oneDNN's wide 2x2 convolutions run
        about twice as fast on the CPU; at 64 filters the layout copies around attention cost more than the
        convolutions gain, so narrow models stay NCHW. Every op of the forward pass keeps the
        layout it is given; only the summation order inside the convolutions differs."""
        return torch.channels_last if self.config.filters >= 128 else torch.contiguous_format

    def stem_features(self, raw: torch.Tensor) -> torch.Tensor:
        """The stem's output (B, filters, H, W) from the raw map, with a channel of ones that tells image from the
        stem's zero padding."""
        B, _, H, W = raw.shape
        stem_in = torch.cat([raw, raw.new_ones(B, 1, H, W)], 1)
        return self.stem(stem_in.contiguous(memory_format=self.memory_format()))

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward_raw(self, raw: torch.Tensor, label=None, condition=None) -> torch.Tensor:
        """Head parameters (B, P, H, W) from the raw input map (see ``embed_input``)."""
        B, _, H, W = raw.shape
        nhwc = self.memory_format()
        raw = raw.contiguous(memory_format=nhwc)
        # With checkpointing the stem and the condition stack are recomputed too: their inputs (the raw map, the
        # top codes) are kept anyway, their padded copies (8 MB per 64x64 map at 256 filters) need not be.
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        cond = _run(recompute, self.condition_features, condition, (H, W)) if self.condition is not None else None
        if cond is not None:
            cond = cond.contiguous(memory_format=nhwc)
        bg = background(H, W, raw.device, raw.dtype).expand(B, -1, -1, -1).contiguous(memory_format=nhwc)
        h = _run(recompute, self.stem_features, raw)
        for block in self.blocks:
            h = block(h, raw, bg, label, cond, recompute=recompute)
        return self.head(h)

    def forward(self, x: torch.Tensor, label=None, condition=None) -> torch.Tensor:
        """Head parameters (B, P, H, W) for uint8 images (B, C, H, W) or int64 codes (B, H, W)."""
        return self.forward_raw(self.embed_input(x), label, condition)

    def log_prob(self, x: torch.Tensor, condition=None, label=None) -> torch.Tensor:
        """Per-position log-likelihood in nats, shape (B, H, W) (pixel channels summed)."""
        self.check_inputs(x, label, condition)
        if label is not None:
            label = torch.as_tensor(label, device=x.device).long().expand(x.shape[0])
        params = self(x, label=label, condition=condition)
        if params.dtype != torch.float64:
            params = params.float()  # the likelihood itself in fp32 even under bf16 autocast
        return self.head.log_prob(params, x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_parameters(config: ModelConfig) -> int:
    """Parameters of ``PixelSNAIL(config)``, counted on the meta device (no memory, even for GPU-scale presets)."""
    with torch.device("meta"):
        return PixelSNAIL(config).num_parameters()
