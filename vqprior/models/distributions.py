"""Pure distribution functions: discretized logistic mixture (PixelCNN++) and filtered categorical sampling.

Parameter layout of the logistic mixture, per position, for C channels and M mixtures:
``[logits (M) | means (C*M) | log-scales (C*M) | coupling (3*M, only when C == 3)]``, each block channel-major.
Pixel values live on [-1, 1] with 256 levels: value v maps to v / 127.5 - 1, bin half-width 1/255.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0
HALF_BIN = 1.0 / 255.0


def split_logistic_params(params: torch.Tensor, channels: int, mixtures: int):
    """Split (B, P, *S) params into logits (B, M, *S), means and log-scales (B, C, M, *S), coupling (B, 3, M, *S)."""
    B, S = params.shape[0], params.shape[2:]
    logits = params[:, :mixtures]
    per_mixture = 3 * channels if channels == 3 else 2 * channels  # means, log-scales (+ coupling for RGB)
    rest = params[:, mixtures:].reshape(B, per_mixture, mixtures, *S)
    means = rest[:, :channels]
    log_scales = rest[:, channels:2 * channels].clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(rest[:, 2 * channels:2 * channels + 3]) if channels == 3 else None
    return logits, means, log_scales, coeffs


def _coupled_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Means after channel coupling: G += c0 * R, B += c1 * R + c2 * G. ``x`` is (B, C, 1, *S)."""
    if coeffs is None:
        return means
    m_r = means[:, 0]
    m_g = means[:, 1] + coeffs[:, 0] * x[:, 0]
    m_b = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
    return torch.stack([m_r, m_g, m_b], 1)


def logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """Log-probability in nats of discretized pixels ``x`` (B, C, *S) in [-1, 1] under ``params``; shape (B, *S)."""
    channels = x.shape[1]
    logits, means, log_scales, coeffs = split_logistic_params(params, channels, mixtures)
    x = x.unsqueeze(2)  # (B, C, 1, *S)
    centered = x - _coupled_means(means, coeffs, x)
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + HALF_BIN)
    min_in = inv_s * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): used for value 0
    log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): used for value 255
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    # Interior bins: log of the CDF difference, or the density at the bin centre when the difference underflows.
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid - math.log(127.5))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))
    return torch.logsumexp(log_probs.sum(1) + F.log_softmax(logits, 1), dim=1)


def uint8_to_unit(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 pixel values 0..255 -> [-1, 1]."""
    return x.to(dtype) / 127.5 - 1.0


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> nearest of the 256 levels as uint8."""
    return torch.round((x.clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8)


def _fp32(params: torch.Tensor):
    """The sampling arithmetic's context and input: autocast off and at least float32 (float64 stays float64).
    Under bf16 the uniform noise would have ~1,800 distinct values and ``1 - 1e-7`` would round to 1, so draws
    would stray far from the model's distribution (total-variation distance ~0.2); the parameters themselves may
    come from a bf16 forward pass."""
    if params.dtype in (torch.float16, torch.bfloat16):
        params = params.float()
    return torch.autocast(params.device.type, enabled=False), params


def _gumbel(shape, generator, device, dtype) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))


def sample_logistic_mixture(params: torch.Tensor, channels: int, mixtures: int,
                            generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Sample discretized pixels from (B, P) params at one position; returns (B, C) values on the 256-level grid.

    Component by Gumbel-max over logits / T, each channel by the inverse logistic CDF with scale * T, coupled to the
    already sampled (rounded) earlier channels, clamped to [-1, 1] and rounded to the 256 levels. The noise and the
    inverse CDF are (at least) float32 whatever the autocast (see ``_fp32``).
    """
    fp32, params = _fp32(params)
    with fp32:
        return _sample_logistic_mixture(params, channels, mixtures, generator, temperature)


def _sample_logistic_mixture(params, channels, mixtures, generator, temperature) -> torch.Tensor:
    B = params.shape[0]
    logits, means, log_scales, coeffs = split_logistic_params(params, channels, mixtures)  # (B, M), (B, C, M)
    noise = _gumbel((B, mixtures), generator, params.device, params.dtype)
    k = torch.argmax(logits / temperature + noise, dim=1)  # (B,)
    pick = lambda t: t.gather(-1, k.view(B, 1, 1).expand(B, t.shape[1], 1)).squeeze(-1)  # noqa: E731
    mu, log_s = pick(means), pick(log_scales)
    c = pick(coeffs) if coeffs is not None else None
    u = torch.rand((B, channels), generator=generator, device=params.device, dtype=params.dtype)
    u = u.clamp(1e-5, 1.0 - 1e-5)
    logistic = torch.log(u) - torch.log1p(-u)
    out = []
    for ch in range(channels):
        m = mu[:, ch]
        if c is not None and ch == 1:
            m = m + c[:, 0] * out[0]
        elif c is not None and ch == 2:
            m = m + c[:, 1] * out[0] + c[:, 2] * out[1]
        value = m + torch.exp(log_s[:, ch]) * temperature * logistic[:, ch]
        out.append(torch.round((value.clamp(-1, 1) + 1.0) * 127.5) / 127.5 - 1.0)
    return torch.stack(out, 1)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of (B, K) logits; filtered entries become -inf.

    Each control is independent: top_k=0 and top_p=1.0 disable them. The most likely entry always survives.
    """
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop an entry when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sample (B,) indices from (B, K) logits by Gumbel-max after filtering, in float32 whatever the autocast."""
    fp32, logits = _fp32(logits)
    with fp32:
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return torch.argmax(filtered + _gumbel(filtered.shape, generator, logits.device, logits.dtype), dim=-1)
