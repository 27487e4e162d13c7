"""A position's discretized logistic mixture, channel by channel: the exact conditionals p(R), p(G | R),
p(B | R, G) that the lossless coder turns into integer tables and guided pixel sampling mixes.

Pixels follow the PixelCNN++ factorization of one position's mixture:

    p(R) = sum_k pi_k p_k(R),   p(G | R) = sum_k w_k(R) p_k(G | R),   p(B | R, G) = sum_k w_k(R, G) p_k(B | R, G)

with ``w_k`` the posterior over components given the earlier channels, ``w_k ∝ pi_k prod_{c' < c} p_k(x_c')``, and
``p_k(G | R)`` the component's logistic with the coupled mean ``mu_G + c_0 R`` (``B``: ``mu_B + c_1 R + c_2 G``).
The product of the three conditionals is exactly the joint mixture that ``logistic_mixture_log_prob`` scores.
Everything is float64 on the CPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vqprior.models.distributions import HALF_BIN, split_logistic_params

LEVELS = 256
# Upper edges of the bins of values 0..254 on the [-1, 1] grid (value v sits at 2v/255 - 1, half-width 1/255).
_EDGES = torch.arange(LEVELS - 1, dtype=torch.float64) * (2.0 / 255.0) - 1.0 + HALF_BIN
_LOG_FLOOR = -1e30  # a component that gives an observed value no mass at all (zero-width bin) drops out


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate on both sides of -ln 2."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


class PixelConditionals:
    """One position's mixture for a batch, coded channel by channel: ``table(c)`` gives the (B, 256) frequencies
    of channel c given the channels observed so far, ``observe(c, values)`` records channel c's values (uint8)."""

    def __init__(self, params: torch.Tensor, channels: int, mixtures: int, temperature: float = 1.0):
        logits, means, log_scales, coeffs = split_logistic_params(params.detach().cpu(), channels, mixtures)
        self.channels = channels
        # (B, M): log pi_k, then the posterior given earlier channels. ``temperature`` (guided sampling, never
        # coding) is the sampler's: mixture logits / T and every scale * T (distributions.sample_logistic_mixture).
        self.log_w = F.log_softmax(logits.double() / temperature if temperature != 1.0 else logits.double(), 1)
        self.means = means.double()  # (B, C, M)
        self.inv_s = torch.exp(-log_scales.double())  # (B, C, M)
        if temperature != 1.0:
            self.inv_s = self.inv_s / temperature
        self.coeffs = coeffs.double() if coeffs is not None else None  # (B, 3, M)
        self.x: list[torch.Tensor] = []  # observed channels on [-1, 1], (B, 1) each

    def _mean(self, c: int) -> torch.Tensor:
        """Channel c's component means (B, M), coupled to the observed earlier channels (PixelCNN++)."""
        m = self.means[:, c]
        if self.coeffs is not None and c == 1:
            m = m + self.coeffs[:, 0] * self.x[0]
        elif self.coeffs is not None and c == 2:
            m = m + self.coeffs[:, 1] * self.x[0] + self.coeffs[:, 2] * self.x[1]
        return m

    def pmf(self, c: int) -> torch.Tensor:
        """(B, 256) float64 probabilities of channel c's values given the observed earlier channels."""
        if c != len(self.x):
            raise ValueError(f"channel {c} asked before channels 0..{c - 1} were observed")
        mean, inv_s = self._mean(c).unsqueeze(-1), self.inv_s[:, c].unsqueeze(-1)  # (B, M, 1)
        cdf = torch.sigmoid((_EDGES - mean) * inv_s)  # (B, M, 255)
        B, M = cdf.shape[:2]
        cdf = torch.cat([cdf.new_zeros(B, M, 1), cdf, cdf.new_ones(B, M, 1)], 2)
        per_component = cdf[..., 1:] - cdf[..., :-1]  # (B, M, 256), each row sums to 1
        weights = torch.softmax(self.log_w, 1).unsqueeze(-1)
        return (weights * per_component).sum(1)

    def observe(self, c: int, values: torch.Tensor) -> None:
        """Channel c's values (B,) uint8: update the component posterior with log p_k(value) and keep the value."""
        v = values.to(torch.float64).view(-1, 1)  # (B, 1)
        self.log_w = self.log_w + _log_bin_mass(v, self._mean(c), self.inv_s[:, c])
        self.x.append(v / 127.5 - 1.0)

    def log_pmf(self, c: int) -> torch.Tensor:
        """(B, 256) float64 log-probabilities of channel c's values given the observed earlier channels, accurate
        in the tails (guided sampling divides two of them; ``pmf``'s differences of CDFs lose the upper tail)."""
        if c != len(self.x):
            raise ValueError(f"channel {c} asked before channels 0..{c - 1} were observed")
        z = (_EDGES - self._mean(c).unsqueeze(-1)) * self.inv_s[:, c].unsqueeze(-1)  # (B, M, 255) standardized edges
        log_cdf, log_sf = F.logsigmoid(z), F.logsigmoid(-z)  # log CDF and log(1 - CDF) at each edge
        # Bin v lies between edges v-1 (a) and v (b); as in _log_bin_mass, its mass comes from the upper tail when
        # the bin lies above the mean, else from the lower one, each edge's logsigmoid computed once for two bins.
        above = z[..., :-1] > 0
        base = torch.where(above, log_sf[..., :-1], log_cdf[..., 1:])
        # log(1 - exp(d)) as log(-expm1(d)): accurate to ~1e-16 absolute for every d < 0, all a log-probability
        # needs (_log1mexp's second branch buys relative accuracy of results near 0, at twice the cost).
        inner = base + torch.log(-torch.expm1(torch.where(above, log_sf[..., 1:] - log_sf[..., :-1],
                                                          log_cdf[..., :-1] - log_cdf[..., 1:])))
        per_component = torch.cat([log_cdf[..., :1], inner, log_sf[..., -1:]], -1)  # (B, M, 256)
        per_component = torch.nan_to_num(per_component, nan=_LOG_FLOOR, neginf=_LOG_FLOOR).clamp_min(_LOG_FLOOR)
        log_w = self.log_w - torch.logsumexp(self.log_w, 1, keepdim=True)
        return torch.logsumexp(log_w.unsqueeze(-1) + per_component, 1)


def _log_bin_mass(v: torch.Tensor, mean: torch.Tensor, inv_s: torch.Tensor) -> torch.Tensor:
    """log of the mass that logistics of ``mean`` and ``1 / inv_s`` give the bins of values ``v`` (float64 0..255),
    broadcast together, floored at _LOG_FLOOR (a zero-width bin)."""
    x = v / 127.5 - 1.0
    a, b = (x - HALF_BIN - mean) * inv_s, (x + HALF_BIN - mean) * inv_s  # bin edges, standardized
    # log(sigmoid(b) - sigmoid(a)) without cancellation: from the upper tail when the whole bin lies above the
    # mean, else from the lower one; the edge bins reach to -inf / +inf.
    upper = F.logsigmoid(-a) + _log1mexp(F.logsigmoid(-b) - F.logsigmoid(-a))
    lower = F.logsigmoid(b) + _log1mexp(F.logsigmoid(a) - F.logsigmoid(b))
    log_p = torch.where(a > 0, upper, lower)
    log_p = torch.where(v == 0, F.logsigmoid(b), torch.where(v == 255, F.logsigmoid(-a), log_p))
    return torch.nan_to_num(log_p, nan=_LOG_FLOOR, neginf=_LOG_FLOOR).clamp_min(_LOG_FLOOR)
