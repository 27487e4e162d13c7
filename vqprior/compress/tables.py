"""Integer probability tables for entropy coding: the model's exact conditionals, quantized deterministically.

Every table is computed in float64 on the CPU from the model's (float32) head parameters, then turned into integer
frequencies that sum to ``TOTAL = 2**PRECISION`` with every symbol at least 1, so any value stays codable whatever
the model says. Encoder and decoder call these functions on identical inputs with identical shapes, and the only
reductions whose order could matter act on integers, so both sides get the same integers bit for bit.

Pixel tables come from ``vqprior.models.conditionals.PixelConditionals`` (the channel-by-channel mixture).
"""
from __future__ import annotations

import numpy as np
import torch

from vqprior.errors import UserError
from vqprior.models.conditionals import PixelConditionals

PRECISION = 24  # constriction's default coders (32-bit words) code probabilities of 24 bits
TOTAL = 1 << PRECISION


def quantize(pmf: np.ndarray) -> np.ndarray:
    """(n, K) float64 probabilities (rows summing to ~1) -> (n, K) int64 frequencies >= 1, each row summing to TOTAL.

    Each symbol gets 1 + floor(p * (TOTAL - K)); the few units the floors leave over (or, for a row summing to
    slightly more than 1, take away) go to the row's first most likely symbol. Integer sums only, so the result
    depends on nothing but the elementwise float64 values.
    """
    n, K = pmf.shape
    if not np.isfinite(pmf).all() or (pmf < 0).any():
        raise UserError("the model gives non-finite or negative probabilities; cannot code with it")
    free = TOTAL - K
    q = np.floor(np.minimum(pmf, 1.0) * free).astype(np.int64) + 1
    rest = TOTAL - q.sum(1)
    top = np.argmax(q, 1)
    rows = np.arange(n)
    q[rows, top] += rest
    if (q[rows, top] < 1).any():
        raise UserError("the model's probabilities do not sum to 1; cannot code with it")
    return q


def categorical_table(logits: torch.Tensor) -> np.ndarray:
    """(B, K) logits (code priors) -> (B, K) integer frequencies."""
    return quantize(torch.softmax(logits.detach().to("cpu", torch.float64), 1).numpy())


def uniform_table(batch: int, size: int) -> np.ndarray:
    """(batch, size) frequencies of the uniform distribution (used for the labels of class-conditional models)."""
    return quantize(np.full((batch, size), 1.0 / size))


def pixel_table(mixture: PixelConditionals, c: int) -> np.ndarray:
    """Channel c's (B, 256) integer frequencies given the channels ``mixture`` has observed."""
    return quantize(mixture.pmf(c).numpy())
