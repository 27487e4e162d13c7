"""Classifier-free guidance (Ho & Salimans 2022) for models trained with a null class (docs/guidance.md).

At guidance scale W every conditional the sampler draws from becomes

    p_W(x_i | x_<i)  ∝  p(x_i | x_<i, y)^(1+W) · p(x_i | x_<i)^(-W)

normalised over the discrete support of x_i: the K codes of the categorical head, or, for the pixel head, the 256
values of each sub-pixel in channel order (R, then G given R, then B given R and G), using the exact channel-by-channel
mixture conditionals of the lossless coder (``vqprior.models.conditionals.PixelConditionals``). p(x_i | x_<i) is the
same network given the null label (``vqprior.models.null_class``); both streams run as one batch of 2B rows (labels y,
then the null label), and the sampled value goes back into both. Temperature, top-k and top-p act on the guided
distribution (categorical: on its logits, as unguided; pixels: the temperature tempers both mixtures as the unguided
sampler does, then they are combined). W = 0 is the unguided sampler itself (``Unguided``): it never evaluates the null
stream.

``Unguided`` and ``Guidance`` are the draw policies of ``vqprior.sampling.sampler``'s loops: ``inputs`` gives the label
and condition rows the loop runs (B or 2B), ``__call__`` turns the head parameters of one position into the (B, ...)
sampled values.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from vqprior.errors import UserError
from vqprior.models.distributions import _gumbel, sample_categorical
from vqprior.models.null_class import null_label


def check_guidance(model, scale) -> float:
    """``scale`` as a float after checking it (a one-line UserError): finite and >= 0, and W > 0 needs a model
    trained with a null class."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise UserError(f"guidance must be a finite number >= 0 (0: off), got {scale!r}")
    if scale:
        null_label(model.config, "guidance")
    return float(scale)


def guided_log_probs(log_cond: torch.Tensor, log_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised log p_W = log_softmax((1+W) log p(.|y) - W log p(.)) over the last dimension."""
    return torch.log_softmax((1.0 + scale) * log_cond - scale * log_uncond, -1)


class Unguided:
    """Draw from the model's own conditionals (the head's sampler): one stream of B rows."""

    streams = 1

    def __init__(self, model, controls: dict):
        self.model, self.controls = model, controls

    def inputs(self, label, condition):
        return label, condition

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        return self.model.head.sample(params, **self.controls)


class Guidance(Unguided):
    """Draw from the guided conditionals at scale W > 0: two streams, the labels' then the null class's."""

    streams = 2

    def __init__(self, model, controls: dict, scale: float):
        super().__init__(model, controls)
        self.scale = scale
        self.null = null_label(model.config, "guidance")

    def inputs(self, label, condition):
        """(2B,) labels [y, null] and (2B, ...) condition [c, c]: the rows the network runs at each step."""
        label = torch.cat([label, torch.full_like(label, self.null)])
        return label, (None if condition is None else torch.cat([condition, condition]))

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        if params.dtype in (torch.float16, torch.bfloat16):
            params = params.float()  # the sampling arithmetic in float32 at least, as distributions._fp32
        cond, uncond = params.chunk(2)
        with torch.autocast(params.device.type, enabled=False):
            if self.model.config.head == "codes":
                logits = guided_log_probs(F.log_softmax(cond, -1), F.log_softmax(uncond, -1), self.scale)
                return sample_categorical(logits, **self.controls)
            return self._pixels(cond, uncond)

    def _pixels(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """(B, C) uint8 values, sub-pixel by sub-pixel from the guided table of each channel given the earlier ones
        (float64 host arithmetic), by Gumbel-max. The noise of every channel is drawn at once on the device from
        the sampler's generator; it and both streams' parameters reach the host in one copy, and the values go back
        in one: a position waits for the device once, not once per channel and stream."""
        from vqprior.models.conditionals import LEVELS, PixelConditionals

        c, (B, P), device = self.model.config, cond.shape, cond.device
        generator, temperature = self.controls.get("generator"), self.controls.get("temperature", 1.0)
        noise = _gumbel((c.channels, B, LEVELS), generator, device, cond.dtype)
        host = torch.cat([cond.flatten(), uncond.flatten(), noise.flatten()]).cpu()
        cond, uncond, noise = host[:B * P].view(B, P), host[B * P:2 * B * P].view(B, P), host[2 * B * P:]
        noise = noise.view(c.channels, B, LEVELS)
        streams = [PixelConditionals(p, c.channels, c.mixtures, temperature) for p in (cond, uncond)]
        out = []
        for ch in range(c.channels):
            log_p = guided_log_probs(streams[0].log_pmf(ch), streams[1].log_pmf(ch), self.scale)  # (B, 256)
            value = torch.argmax(log_p.to(noise.dtype) + noise[ch], -1)
            for s in streams:
                s.observe(ch, value)
            out.append(value)
        return torch.stack(out, 1).to(device, torch.uint8)
