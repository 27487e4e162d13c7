"""Optional TensorBoard mirror of a training run (``--tensorboard``; ``pip install vqprior[tensorboard]``).

``metrics.jsonl`` stays the record of a run; this module only repeats what the training loop logs there (train
losses, bits/dim, learning rate, throughput, held-out metrics) as TensorBoard scalars, plus every sample grid as an
image, under ``<run>/tensorboard``. TensorBoard is imported only when asked for, so it is never a dependency.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vqprior.errors import UserError


class TensorBoardLog:
    """Scalars as ``<split>/<name>`` and sample grids as ``samples`` in ``out_dir/tensorboard``."""

    def __init__(self, out_dir: str | os.PathLike, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'vqprior[tensorboard]'") from None
        # purge_step drops events a killed run logged after its last checkpoint, so a resumed run's curves do not
        # double back on themselves.
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=start_step or None)

    def scalars(self, split: str, step: int, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def image(self, tag: str, step: int, grid: torch.Tensor) -> None:
        """``grid``: uint8 (3, H, W)."""
        self.writer.add_image(tag, grid, step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["TensorBoardLog"]
