"""Devices: the ``--device`` string checked before any work, why a machine's GPU cannot be used, and pinned host
memory for CUDA loaders (docs/gpu.md). cuDNN's autotuner is switched with deterministic mode, in
``vqprior.runtime.determinism``."""
from __future__ import annotations

import os
import re
import warnings

import torch

from vqprior.errors import UserError

__all__ = ["check_device", "cuda_unusable", "pin_memory"]

NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"  # present wherever the NVIDIA kernel driver is loaded (Linux)


def _cuda_available() -> tuple[bool, str]:
    """(torch.cuda.is_available(), the first line of the warning torch gave while finding out, or "")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = [str(w.message).strip().splitlines()[0] for w in caught if "CUDA" in str(w.message)]
    return available, (said[0] if said else "")


def cuda_unusable() -> str | None:
    """A one-line reason when this machine has an NVIDIA GPU driver and a CUDA build of torch but torch cannot use
    CUDA (typically a driver older than the torch build needs), naming the driver and the torch build; None when
    CUDA works, when torch is a CPU build, when no NVIDIA driver is loaded, or when CUDA_VISIBLE_DEVICES hides every
    GPU on purpose."""
    if torch.version.cuda is None or os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None
    available, said = _cuda_available()
    if available:
        return None
    try:
        with open(NVIDIA_DRIVER_FILE) as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]*)", f.read())
        driver = f"NVIDIA driver {found.group(1)}" if found else "an NVIDIA driver"
    except OSError:
        if not said:
            return None  # no driver loaded and nothing said: a machine without a GPU
        driver = "an NVIDIA driver of unknown version"
    reason = f" ({said.rstrip('.')})" if said else ""
    return (f"CUDA is present but unusable: {driver} with torch {torch.__version__} built for CUDA "
            f"{torch.version.cuda}{reason}; a driver that supports CUDA {torch.version.cuda}, or a torch built for "
            f"the driver's CUDA, fixes it")


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
        raise UserError(f"device {text!r} requested but " + (cuda_unusable() or "CUDA is not available"))
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"device {text!r} requested but this machine has {count} CUDA device(s): "
                        f"cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}")
    return device


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin their batches: on CUDA, so that ``.to(device,
    non_blocking=True)`` copies asynchronously instead of blocking the host."""
    return torch.device(device).type == "cuda"
