"""Devices: the ``--device`` string checked before any work, and pinned host memory for CUDA loaders (docs/gpu.md).
cuDNN's autotuner is switched with deterministic mode, in ``vqprior.runtime.determinism``."""
from __future__ import annotations

import torch

from vqprior.errors import UserError

__all__ = ["check_device", "pin_memory"]


def check_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch.device if this machine has it: cpu, cuda (the current GPU) or cuda:N with N below the
    number of visible GPUs; anything else is a one-line UserError naming what exists."""
    text = str(name)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
        return device
    if device.type != "cuda":
        raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {text!r} requested but CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"device {text!r} requested but this machine has {count} CUDA device(s): "
                        f"cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}")
    return device


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin their batches: on CUDA, so that ``.to(device,
    non_blocking=True)`` copies asynchronously instead of blocking the host."""
    return torch.device(device).type == "cuda"
