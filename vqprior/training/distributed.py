"""Multi-process (DistributedDataParallel) plumbing for the train commands launched by ``torchrun``.

``torchrun --nproc-per-node N`` sets WORLD_SIZE, RANK and LOCAL_RANK; ``init_distributed`` reads them and joins the
process group (gloo on CPU, NCCL on CUDA with one GPU per local rank, bound to it with ``device_id`` where torch
supports it). A plain single-process run never touches ``torch.distributed``: every helper here is a no-op (or the
identity) when no process group is initialised.

The group's timeout bounds every collective wait, in particular the other ranks' wait while rank 0 alone writes a
checkpoint or samples a grid: a rank that hangs or dies ends the run with an error after ``timeout_minutes``
instead of leaving the others waiting forever (NCCL's watchdog and gloo both enforce it).
"""
from __future__ import annotations

import atexit
import inspect
import os
from datetime import timedelta

import torch

from vqprior.errors import InputError, UserError

DEFAULT_TIMEOUT_MINUTES = 30.0  # room for rank 0's grid and checkpoint of a big model; PyTorch's NCCL default is 10


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if not _group_ready():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def get_world_size() -> int:
    if not _group_ready():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: torch.device | str,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's environment; return (rank, world_size, device).

    Without WORLD_SIZE > 1 in the environment this returns (0, 1, device) and initialises nothing.
    On CUDA each process takes the GPU of its LOCAL_RANK (an explicit cuda:N is overridden).
    """
    device = torch.device(device)
    world = world_size_from_env()
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here; "
                            f"use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        options = {"timeout": timedelta(minutes=timeout_minutes)}
        if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            options["device_id"] = device  # NCCL binds its communicator to this GPU now, not at the first call
        dist.init_process_group(backend, rank=rank, world_size=world, **options)
        atexit.register(cleanup)  # commands exit through click's sys.exit; leave the group cleanly then
    return dist.get_rank(), dist.get_world_size(), device


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if _group_ready():
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it); the identity in a single process."""
    if _group_ready():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_weighted_means(metrics: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Per-rank averages over ``count`` items -> the average over every rank's items (weights = counts).

    Exact for metrics that are means over equally sized items (bits/dim, bits/code, MSE); every rank must pass the
    same keys. A rank with ``count`` 0 contributes nothing.
    """
    if not _group_ready():
        return dict(metrics)
    keys = sorted(metrics)
    values = [float(metrics[k]) * count for k in keys] + [float(count)]
    buf = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))
    total = float(buf[-1])
    if total <= 0:
        raise InputError("nothing to evaluate: the split is empty")
    return {k: float(buf[i]) / total for i, k in enumerate(keys)}


def evaluate_sharded(task, eval_model, val_set, batch_size: int, num_workers: int, loader_rng, device) -> dict:
    """Distributed eval: each rank evaluates its shard; the per-rank averages are reduced weighted by shard size."""
    from torch.utils.data import DataLoader

    rank, world = get_rank(), get_world_size()
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=loader_rng())
    result = task.evaluate(eval_model, loader) if len(shard) else {}
    # Every rank needs the keys even when its shard is empty (fewer held-out items than ranks).
    keys = sorted(result) if len(shard) else sorted(task.evaluate(eval_model, DataLoader(
        torch.utils.data.Subset(val_set, [0]), batch_size=1, generator=loader_rng())))
    reduced = reduce_weighted_means({k: result.get(k, 0.0) for k in keys}, len(shard), device)
    if "mse" in reduced and "psnr" in reduced:
        from vqprior.evaluation.metrics import (
            psnr_from_mse,  # PSNR is not linear in the MSE: recompute it from the reduced MSE
        )

        reduced["psnr"] = psnr_from_mse(reduced["mse"])
    return reduced
