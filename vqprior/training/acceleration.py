"""Training-speed switches, kept out of the loop (vqprior.training.loop) so the plain path stays readable:
``torch.compile`` of the training model, the optimizer's fused kernel, gradient accumulation over micro-batches, and
the gradient norm that the non-finite guard and clipping share. None of them changes the objective; the speed
switches were chosen from profiles of the step (bench/train_speed.py times it).
"""
from __future__ import annotations

import contextlib
import time

import torch

from vqprior.runtime.compiler import check_compiler
from vqprior.runtime.precision import autocast


def compile_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(module)`` after checking the toolchain. The original module keeps its parameters and
    ``state_dict`` keys (checkpoints never see ``_orig_mod.``); only the training forward/backward is compiled.
    Compilation happens lazily at the first call, which the loop times and reports as the compile time."""
    check_compiler(device)
    return torch.compile(module)


def make_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has one for the device (CPU and CUDA): one pass over all parameters
    instead of a Python loop of small ops per parameter; the same update up to float rounding."""
    device_type = next(model.parameters()).device.type
    fused = device_type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=fused)


def accumulate_gradients(task, model, batch: dict[str, torch.Tensor], config, scaler, ddp=None):
    """Forward and backward over ``config.grad_accum`` equal micro-batches of ``batch``, their gradients summed (each
    micro-batch's mean loss divided by their number: the gradient of the whole batch's mean loss, at the activation
    memory of one micro-batch). Under DistributedDataParallel (``ddp``) the gradients are all-reduced once, with the
    last micro-batch. Returns the summed loss and the mean of each metric, on the device."""
    n = config.grad_accum
    micro = [dict(zip(batch, parts)) for parts in zip(*(v.tensor_split(n) for v in batch.values()))]
    device = next(iter(batch.values())).device
    loss_sum, totals = 0.0, {}
    for i, part in enumerate(micro):
        with ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext():
            with autocast(device, config.precision):
                loss, metrics = task.loss(model, part)
            scaler.scale(loss / n).backward()
        loss_sum = loss_sum + loss.detach()
        totals = {k: totals.get(k, 0) + v for k, v in metrics.items()}
    return loss_sum, {k: v / n for k, v in totals.items()}


def clip_and_measure(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The total gradient norm (one fused reduction, ``torch._foreach_norm``), clipping to ``max_norm`` when it is
    positive. A non-finite gradient anywhere makes the norm non-finite, so the caller's guard needs one host sync
    instead of one ``isfinite`` per parameter."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # returns the norm before clipping
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class StepTimer:
    """Wall time of the training steps alone (evaluations, sample grids and checkpoints excluded), accumulated
    across resumes through the checkpoint's ``train_seconds``."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = float(seconds)
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        """End the current step; returns its duration."""
        took = time.perf_counter() - self._start
        self.seconds += took
        self._start = None
        return took


class Throughput:
    """Items/s of the steady-state steps since the last report. A process's first step pays one-off costs
    (torch.compile's compilation, allocator warm-up), so it is left out of every rate."""

    def __init__(self, timer: StepTimer):
        self.timer, self.items, self.since, self.first = timer, 0, timer.seconds, True

    def add(self, items: int) -> bool:
        """Count a finished step; True if it was this process's first."""
        if self.first:
            self.first, self.items, self.since = False, 0, self.timer.seconds
            return True
        self.items += items
        return False

    def discount(self, items: int) -> None:
        """Take back the items of steps found skipped (the loop learns of them at its next read of the device)."""
        self.items = max(self.items - items, 0)

    def rate(self, items: int, took: float) -> float:
        """The rate since the last call (or, when no steady-state step was counted since, e.g. a resumed process's
        first step landing on a logging step, that step's own rate); starts a new window."""
        seconds = self.timer.seconds - self.since
        rate = self.items / max(seconds, 1e-9) if self.items else items / max(took, 1e-9)
        self.items, self.since = 0, self.timer.seconds
        return rate


__all__ = ["check_compiler", "compile_model", "make_optimizer", "clip_and_measure", "StepTimer", "Throughput"]
