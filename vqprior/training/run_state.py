"""What makes a training run exact and resumable, apart from the loop itself (vqprior.training.loop): the step-indexed
batch sampler (batch order a pure function of seed and step), the Polyak EMA, the SIGINT/SIGTERM stop flag, the RNG
state saved with a checkpoint (the training device's generators only), the run folder (``prepare_run_dir``) and the
metrics.jsonl record that a resumed run truncates to its checkpoint's step.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from vqprior.checkpoint import read_checkpoint
from vqprior.errors import UserError
from vqprior.io import atomic_write

CHECKPOINT_NAME = "latest.pt"  # a run folder's checkpoint


class StepBatchSampler(Sampler):
    """Batches of indices as a pure function of (seed, step): epoch e is ``randperm(N)`` seeded by (seed, e).

    Starting at ``start_step`` reproduces exactly the batches an uninterrupted run would see from that step on.
    ``rank``/``world_size`` take this process's slice of each global batch (distributed training).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int, steps: int, rank: int = 0,
                 world_size: int = 1):
        if size < 1:
            raise UserError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.steps, self.rank, self.world_size = start_step, steps, rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(pos // self.size)[pos % self.size]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(step)
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


class EMA:
    """Polyak averaging of parameters; buffers (e.g. EMA codebooks) are copied from the live model.

    The decay warms up as min(decay, (1 + t) / (10 + t)) at update t (as TensorFlow's ExponentialMovingAverage
    with num_updates), so short runs are not evaluated with weights still close to their initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        live = model.state_dict()
        # A restored state comes from a checkpoint read to the CPU: each average lives where its tensor does (the
        # training device), or the fused update would mix devices.
        self.state = {k: v.detach().to(live[k].device if k in live else v.device, copy=True)
                      for k, v in (state or live).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, applied: torch.Tensor | None = None) -> None:
        """One averaging step towards ``model``'s weights. ``applied``, a 0-d float tensor (1: the optimizer step
        was applied, 0: skipped), makes a skipped step leave the average untouched without a host sync."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        if getattr(self, "_model", None) is not model:
            # Built once per model, not per step: the parameter and buffer tensors keep their identity.
            params = dict(model.named_parameters())
            self._model = model
            self._pairs = ([self.state[n] for n in self.names], [params[n].detach() for n in self.names])
            self._buffers = [(self.state[name], buf) for name, buf in model.named_buffers()]
        # average += weight * (live - average) over every parameter in fused multi-tensor kernels. The weight is a
        # device tensor when ``applied`` is given (a skipped step moves by 0): one 0-d tensor for all parameters,
        # not a list of them, which CUDA's fused foreach kernels do not take (one kernel per parameter instead).
        weight = 1.0 - decay if applied is None else applied * (1.0 - decay)
        averages, live = self._pairs
        steps = torch._foreach_sub(live, averages)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(averages, steps)
        for averaged, buf in self._buffers:
            averaged.copy_(buf)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop then checkpoints and returns (a second signal interrupts at once)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        if in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The generators a run on ``device`` draws from: the CPU one always, and the one CUDA device in use (not every
    visible GPU: a resume on a machine with fewer GPUs must still find its state, and touching every GPU would
    create a context on each)."""
    device = torch.device(device)
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(_cuda_index(device))
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu", seed: int = 0) -> None:
    """Restore ``rng_state``'s generators for a run on ``device``. A checkpoint without CUDA state (a CPU run)
    resumed on a GPU seeds its CUDA generator from ``seed`` (a pure function of the run, e.g. its seed and step),
    so the resumed run is still reproducible. Older checkpoints hold a list of every visible GPU's state: the
    entry of the device in use is taken (the first when the list is shorter)."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return
    saved = state.get("cuda")
    index = _cuda_index(device)
    if isinstance(saved, (list, tuple)):  # older checkpoints: torch.cuda.get_rng_state_all()
        saved = saved[index] if index < len(saved) else (saved[0] if saved else None)
    if saved is None:
        torch.cuda.manual_seed(seed)
    else:
        torch.cuda.set_rng_state(saved, index)


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device``; the copies are asynchronous where the loader pinned them (CUDA)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prepare_run_dir(out_dir: str | os.PathLike, resume: bool, kind: str) -> dict[str, Any] | None:
    """Create ``out_dir``; return the checkpoint to resume from (or None). Refuses to clobber an existing run."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out must be a folder, but a file exists there: {out}")
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists():
        if not resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        data = read_checkpoint(ckpt, kind)
        if "optimizer" not in data:
            raise UserError(f"{ckpt} is an exported checkpoint (weights only, no optimizer state) and cannot be "
                            f"resumed; start a new run from its weights with --init-from {ckpt} --out NEW_FOLDER")
        return data
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"the run folder is not writable: {out}")
    return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint: the resumed run logs those steps again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


__all__ = ["StepBatchSampler", "EMA", "StopFlag", "in_main_thread", "rng_state", "set_rng_state", "to_device",
           "prepare_run_dir", "append_jsonl", "truncate_metrics"]
