"""Deterministic mode: the switches that make a run repeat itself bit for bit on the same machine (docs/exactness.md).

``set_deterministic(True)`` turns on ``torch.use_deterministic_algorithms`` (ops without a deterministic kernel
raise instead of varying; scatter/index kernels take their deterministic paths), cuDNN's deterministic algorithms
with its autotuner (``cudnn.benchmark``) off, and a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG``, which
torch requires in this mode). cuBLAS takes that setting once, at the process's first matrix product on a GPU, so
importing ``vqprior`` sets it (when the environment does not); a process that did GPU work with another setting
before gets a one-line error here instead of torch's traceback at the next matrix product. ``deterministic()`` is
the same for the duration of a ``with`` block (the lossless coder runs in it).

What it guarantees, and where: the same results from the same inputs, seeds, batch sizes and thread count on the
same device model with the same torch / CUDA / cuDNN versions. It does not make a GPU agree with a CPU or with
another GPU model: they run other kernels, which round differently.
"""
from __future__ import annotations

import contextlib
import os

import torch

from vqprior.errors import UserError

CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # one of the two settings torch documents for deterministic cuBLAS
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def check_cublas_workspace() -> None:
    """One-line UserError when deterministic mode cannot hold on a GPU: CUDA already initialised in this process
    without a deterministic cuBLAS workspace setting (its first matrix product fixed the workspace)."""
    if torch.cuda.is_initialized() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        raise UserError("deterministic mode on a GPU needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before the process's "
                        "first CUDA work: import vqprior before using CUDA, or set it in the environment")


def set_deterministic(enabled: bool = True) -> None:
    """Turn deterministic mode on (or back off: torch's defaults, cuDNN autotuning left off)."""
    if enabled:
        if not torch.cuda.is_initialized():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        check_cublas_workspace()
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def is_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic


@contextlib.contextmanager
def autotuned_convolutions():
    """cuDNN's autotuner (the fastest convolution kernels for the shapes seen, picked by timing, so the last bits of
    results may differ between runs) on inside the block (training), unless deterministic mode is on; the previous
    setting restored after it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not is_deterministic()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def deterministic():
    """Deterministic mode inside the block; the previous switches restored after it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_deterministic(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


__all__ = ["CUBLAS_WORKSPACE_CONFIG", "autotuned_convolutions", "check_cublas_workspace", "deterministic",
           "is_deterministic", "set_deterministic"]
