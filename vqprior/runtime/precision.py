"""The numeric precision policy, applied in one place (``apply_precision_policy``) by every entry point that runs a
model (``train``, ``generate``, the ``evaluate`` command):

* ``fp32``: float32 throughout. PyTorch lets CUDA matmuls and (by default) cuDNN convolutions run in TF32, which
  keeps only 10 mantissa bits; both switches are turned off, so "fp32" on a GPU is the fp32 of the CPU and the
  exactness checks (cached sampler == full forward pass) hold there too.
* ``tf32``: float32 storage with TF32 matmuls and convolutions on Ampere+ GPUs (faster; no effect on CPU).
* ``bf16``: ``torch.autocast`` to bfloat16 around the model calls; what runs outside autocast (the likelihood, the
  sampling arithmetic, the optimizer) stays strict float32, so TF32 is off as for fp32. The heads' last projection
  runs in float32 (vqprior.models.heads), so the likelihood is computed from float32 parameters. Refused on a CUDA GPU
  that only emulates bfloat16 (before Ampere): use fp16 there.
* ``fp16``: autocast to float16 (for GPUs without bfloat16); training scales the loss with ``torch.amp.GradScaler``
  (``grad_scaler``), whose state travels in the checkpoint.

Training on CUDA defaults to ``auto`` (``resolve_training_precision``): tf32 on Ampere and later (convolutions several
times faster than strict fp32, float32 storage and likelihood), fp32 elsewhere. Evaluation, sampling, code extraction
and compression default to exact fp32. docs/gpu.md has the reasoning.

The switches are process-wide (they are PyTorch's): the CLI applies a command's policy once
(``apply_precision_policy``); library calls use ``precision_policy``, which restores the previous switches.
"""
from __future__ import annotations

import contextlib

import torch

from vqprior.config import PRECISIONS
from vqprior.errors import UserError

__all__ = ["PRECISIONS", "apply_precision_policy", "autocast", "grad_scaler", "precision_policy",
           "resolve_training_precision", "check_precision", "native_bf16"]

AMPERE = (8, 0)  # the first CUDA capability with TF32 and native bfloat16


def apply_precision_policy(precision: str, device: torch.device | str | None = None) -> None:
    """Set PyTorch's TF32 switches for ``precision`` (one of PRECISIONS), after ``check_precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got {precision!r}")
    if device is not None:
        check_precision(precision, device)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def precision_policy(precision: str, device: torch.device | str | None = None):
    """``apply_precision_policy`` for the duration of a ``with`` block; PyTorch's switches restored after it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    apply_precision_policy(precision, device)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def native_bf16(device: torch.device) -> bool:
    """Whether CUDA ``device`` computes in bfloat16 natively (not emulated through float32, as before Ampere)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword: judge by the capability
        return torch.cuda.get_device_capability(device) >= AMPERE


def check_precision(precision: str, device: torch.device | str) -> None:
    """UserError (one line) for a precision ``device`` cannot run as asked: bf16 on a GPU that only emulates it."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--precision bf16: {name} only emulates bfloat16 (slower than fp32); use --precision fp16 "
                        f"(autocast with loss scaling) or fp32")


def resolve_training_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> the training default for ``device``: tf32 on CUDA GPUs of compute capability 8.0 (Ampere) and
    later, fp32 elsewhere (CPU, older GPUs). Any other value is returned as given."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= AMPERE:
        return "tf32"
    return "fp32"


def autocast(device: torch.device | str, precision: str):
    """The context the model calls run in: autocast to bfloat16 / float16 for "bf16" / "fp16", nothing otherwise."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None:
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The loss scaler of a training run: active for fp16 only (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
