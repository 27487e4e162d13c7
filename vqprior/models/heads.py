"""Output heads: ELU then a 1x1 conv to distribution parameters, plus log_prob / nll / sample for that distribution.

``LogisticMixtureHead`` models pixels (1 or 3 channels, PixelCNN++ channel coupling for RGB);
``CategoricalHead`` models VQ-VAE code indices. Both work on per-position parameter maps (B, P, H, W) and sample
one position at a time from (B, P) parameters, which is what both samplers share.

The last projection runs in float32 even under autocast (``project_float32``): under bf16 it would otherwise output
bfloat16 means, scales and logits (8 mantissa bits), and the "float32 likelihood" would be computed from parameters
already rounded to bf16.
"""
from __future__ import annotations

import torch
from torch import nn

from vqprior.models.activation import elu
from vqprior.models.distributions import (
    logistic_mixture_log_prob,
    sample_categorical,
    sample_logistic_mixture,
    uint8_to_unit,
    unit_to_uint8,
)
from vqprior.models.layers import WNConv2d


def project_float32(conv: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``conv(h)`` in float32 (or wider) whatever the autocast around it: half-precision features are upcast and the
    weights are used as stored."""
    with torch.autocast(h.device.type, enabled=False):
        return conv(h.float() if h.dtype in (torch.float16, torch.bfloat16) else h)


class LogisticMixtureHead(nn.Module):
    """Discretized logistic mixture over ``channels`` pixel channels with ``mixtures`` components."""

    def __init__(self, filters: int, channels: int, mixtures: int):
        super().__init__()
        self.channels, self.mixtures = channels, mixtures
        per_mix = 1 + 2 * channels + (3 if channels == 3 else 0)
        self.out = WNConv2d(filters, mixtures * per_mix, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return project_float32(self.out, elu(h))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) or [-1, 1] float images -> (B, H, W) log-likelihood in nats (channels summed)."""
        if x.dtype == torch.uint8:
            x = uint8_to_unit(x, params.dtype)
        return logistic_mixture_log_prob(x.to(params.dtype), params, self.mixtures)

    def sample(self, params: torch.Tensor, generator=None, temperature: float = 1.0, **_) -> torch.Tensor:
        """(B, P) params of one position -> (B, C) uint8 pixel values."""
        x = sample_logistic_mixture(params, self.channels, self.mixtures, generator, temperature)
        return unit_to_uint8(x)


class CategoricalHead(nn.Module):
    """Categorical distribution over ``num_codes`` code indices."""

    def __init__(self, filters: int, num_codes: int):
        super().__init__()
        self.num_codes = num_codes
        self.out = WNConv2d(filters, num_codes, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return project_float32(self.out, elu(h))

    def log_prob(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (B, H, W) -> (B, H, W) log-probabilities in nats."""
        return torch.log_softmax(logits, 1).gather(1, codes.unsqueeze(1)).squeeze(1)

    def sample(self, logits: torch.Tensor, generator=None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> torch.Tensor:
        """(B, K) logits of one position -> (B,) int64 codes."""
        return sample_categorical(logits, generator, temperature, top_k, top_p)
