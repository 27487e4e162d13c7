"""Devices: the ``--device`` string checked before any work, and the cuDNN kernel choice (docs/gpu.md).

``set_cudnn_benchmark(deterministic)`` is the one switch between cuDNN's autotuner (fastest convolution kernels for
the shapes seen, picked by timing: the choice, and so the last bits of results, may differ between runs) and fixed
kernel choices. Training calls it with ``deterministic=False``; a ``--deterministic`` option passes True.
"""
from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["check_device", "set_cudnn_benchmark", "pin_memory"]


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


def set_cudnn_benchmark(deterministic: bool = False) -> None:
    """cuDNN's autotuner on (fastest kernels for fixed shapes, as in training) unless ``deterministic``."""
    torch.backends.cudnn.benchmark = not deterministic


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin their batches: on CUDA, so that ``.to(device,
    non_blocking=True)`` copies asynchronously instead of blocking the host."""
    return torch.device(device).type == "cuda"
