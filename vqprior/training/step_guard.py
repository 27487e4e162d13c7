"""The training step's non-finite guard and metrics without per-step host syncs (docs/gpu.md, "Host syncs").

Reading a device value on the host (``.item()``, ``float(t)``, ``bool(t)``) waits for every kernel queued before it,
so a loop that reads one per step keeps a GPU idle between steps. Here the decision "was this step's loss and
gradient finite" stays on the device: the fused optimizer skips its update itself when told so by a device flag
(PyTorch's ``found_inf``, the mechanism of ``GradScaler``), the EMA lerps by zero, and counters of skipped steps
accumulate on the device. The loop reads the counters and the step's metrics together, in one sync, at logging and
checkpoint steps only (``read_values``).

What the guard then guarantees: a non-finite loss or gradient never reaches the weights, the optimizer state or the
EMA (exactly as before, on the device); a run of ``max_bad_steps`` consecutive skipped steps is noticed at the next
logging or checkpoint step (at most 10 steps later) rather than at once; as before, a skipped step is neither logged
nor followed by an evaluation, a grid or a checkpoint.
"""
from __future__ import annotations

import torch


def read_values(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """0-d device tensors (and plain numbers) -> floats, with a single device-to-host transfer."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if keys:
        read = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()  # the one sync
        out.update(zip(keys, read))
    return {k: out[k] for k in values}


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-d device flag ``skip`` is 1.

    Fused optimizers (Adam on CPU and CUDA here) take the flag as ``found_inf`` and skip on the device (the step
    count is restored too); any other optimizer needs the flag on the host, which is one sync."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float().reshape(())  # 0-d, like the step counts it is subtracted from
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bool(skip):
        optimizer.step()


class NonFiniteGuard:
    """Device counters of skipped steps: ``skipped`` in all, ``last`` (the latest step was skipped), the current
    run of consecutive bad steps and the longest one (``worst``). ``record`` takes the step's 0-d flags; the loop
    reads ``tensors()`` with ``read_values`` (one sync)."""

    def __init__(self, device: torch.device):
        self.skipped = torch.zeros((), device=device)
        self.last = torch.zeros((), device=device)
        self.run = torch.zeros((), device=device)
        self.worst = torch.zeros((), device=device)

    def record(self, skipped: torch.Tensor, diverging: torch.Tensor) -> None:
        """``skipped``: the step was not applied; ``diverging``: it counts towards the consecutive bad steps that end
        a run (a non-finite loss; under fp16 a gradient overflow alone is the GradScaler's business)."""
        self.skipped += skipped.float()
        self.last = skipped.float()
        self.run = (self.run + 1) * diverging.float()
        self.worst = torch.maximum(self.worst, self.run)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"skipped": self.skipped, "last": self.last, "run": self.run, "worst": self.worst}


__all__ = ["read_values", "step_unless", "NonFiniteGuard"]
