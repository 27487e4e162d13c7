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
import functools
import logging
import platform

import torch

from vqprior.config import PRECISIONS
from vqprior.errors import UserError

__all__ = ["PRECISIONS", "apply_precision_policy", "autocast", "grad_scaler", "precision_policy",
           "resolve_training_precision", "check_precision", "cpu_native_bf16", "native_bf16"]

log = logging.getLogger(__name__)

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
    # Only the two switches apply_precision_policy sets, through the same (legacy) API: restoring through
    # torch.set_float32_matmul_precision as well mixed torch's two APIs, after which torch 2.14 raises at the next
    # get_float32_matmul_precision (a later precision_policy in the same process).
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    apply_precision_policy(precision, device)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def native_bf16(device: torch.device) -> bool:
    """Whether CUDA ``device`` (that GPU, not the current one) computes in bfloat16 natively: compute capability
    8.0 (Ampere) and later; before, bfloat16 is emulated through float32."""
    return torch.cuda.get_device_capability(device) >= AMPERE


def cpu_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86: AVX512-BF16 or AMX; ARM: the BF16 extension), which torch's
    CPU kernels use for bf16 matrix products; without them bf16 is emulated and slower than fp32. Unknown: True."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(check is not None for check in checks):
            return any(check() for check in checks if check is not None)
        wanted = {"avx512_bf16", "amx_bf16"}
    else:
        wanted = {"bf16"}  # ARM's /proc/cpuinfo "Features"
    try:
        with open("/proc/cpuinfo") as f:
            return bool(wanted & set(f.read().split()))
    except OSError:
        return True


def check_precision(precision: str, device: torch.device | str) -> None:
    """UserError (one line) for a precision ``device`` cannot run as asked: bf16 on a GPU that only emulates it.
    bf16 on a CPU without bfloat16 instructions runs, emulated, after one warning line naming the cost."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--precision bf16: {name} only emulates bfloat16 (slower than fp32); use --precision fp16 "
                        f"(autocast with loss scaling) or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_native_bf16():
        _warn_emulated_cpu_bf16()


@functools.lru_cache(maxsize=None)
def _warn_emulated_cpu_bf16() -> None:
    log.warning("Warning: --precision bf16 on a CPU without bfloat16 instructions (no AVX512-BF16, AMX or ARM BF16) "
                "is emulated: several times slower than --precision fp32, with bf16's rounding (docs/gpu.md)")


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
