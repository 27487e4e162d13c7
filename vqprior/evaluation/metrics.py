"""Reconstruction metrics shared by VQ-VAE training, evaluation, plots and the compress command."""
from __future__ import annotations

import math


def psnr_from_mse(mse_255: float) -> float:
    """PSNR in dB for a mean squared error on the 0..255 scale (inf for a perfect reconstruction)."""
    return float("inf") if mse_255 <= 0 else 10.0 * math.log10(255.0 ** 2 / mse_255)
