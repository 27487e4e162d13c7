"""The numeric precision policy, applied in one place (``apply_precision_policy``) by every entry point that runs a
model (``train``, ``generate``, the ``evaluate`` command):

* ``fp32``: float32 throughout. PyTorch lets CUDA matmuls and (by default) cuDNN convolutions run in TF32, which
  keeps only 10 mantissa bits; both switches are turned off, so "fp32" on a GPU is the fp32 of the CPU and the
  exactness checks (cached sampler == full forward pass) hold there too.
* ``tf32``: float32 storage with TF32 matmuls and convolutions on Ampere+ GPUs (faster; no effect on CPU).
* ``bf16``: ``torch.autocast`` to bfloat16 around the model calls; what runs outside autocast (the likelihood, the
  sampling arithmetic, the optimizer) stays strict float32, so TF32 is off as for fp32.

The switches are process-wide (they are PyTorch's); the last policy applied wins.
"""
from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS
from .errors import UserError

__all__ = ["PRECISIONS", "apply_precision_policy", "autocast"]


def apply_precision_policy(precision: str) -> None:
    """Set PyTorch's TF32 switches for ``precision`` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {precision!r}")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device | str, precision: str):
    """The context the model calls run in: bf16 autocast for "bf16", nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
