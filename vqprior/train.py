"""The training loop shared by every model kind: step loop, LR schedule, Polyak EMA, eval, sample grids,
checkpoints, exact resume, graceful stop, the non-finite guard and DistributedDataParallel (``torchrun``).

What is trained is described by a *task* object (``PixelTask``, ``PriorTask``, ``VQVAETask``) with this protocol::

    kind: str                                   checkpoint kind ("pixels" | "prior" | "vqvae")
    build_model() -> nn.Module
    init_model(model, batch) -> None            once before step 0 (weight-norm data-dependent init, codebooks)
    loss(model, batch) -> (Tensor, {str: float})  scalar to minimise + metrics to log
    evaluate(model, loader) -> {str: float}     held-out metrics (model in eval mode, EMA weights)
    grid(model, batch, generator) -> uint8 (N, C, H, W)   images for the PNG grid (samples or reconstructions)
    config_dicts() -> dict                      stored as checkpoint["config"] (plus "train")
    extra_checkpoint() -> dict                  e.g. {"vqvae": {...}} for priors

Resume is exact: the batch order is a pure function of (seed, step), the learning rate of the step, and the RNG
state is saved with the model, optimizer and EMA, so a resumed run equals an uninterrupted one.

Distributed (a process group initialised by ``vqprior.distributed.init_distributed``): every rank builds the same
model and runs the data-dependent init on the same full global batch 0; rank r trains on ``global_batch[r::N]`` and
DDP averages the gradients, so N processes train the model one process would with the same global batch. Rank 0
alone writes checkpoints, metrics and PNGs; eval runs on rank shards of the held-out set and is reduced; the stop
flag and the non-finite check are agreed by an all-reduce each step so every rank leaves the loop at the same step.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import distributed
from .acceleration import StepTimer, clip_and_measure, compile_model, make_optimizer
from .checkpoint import read_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import UserError
from .images import make_grid, save_grid
from .precision import apply_precision_policy, autocast
from .run_state import EMA, StepBatchSampler, StopFlag, append_jsonl, rng_state, set_rng_state, truncate_metrics

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "latest.pt"


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
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


def _reduce_eval(task, eval_model, val_set, batch_size: int, num_workers: int, loader_rng, device) -> dict:
    """Distributed eval: each rank evaluates its shard; the per-rank averages are reduced weighted by shard size."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=loader_rng())
    result = task.evaluate(eval_model, loader) if len(shard) else {}
    # Every rank needs the keys even when its shard is empty (fewer held-out items than ranks).
    keys = sorted(result) if len(shard) else sorted(task.evaluate(eval_model, DataLoader(
        torch.utils.data.Subset(val_set, [0]), batch_size=1, generator=loader_rng())))
    reduced = distributed.reduce_weighted_means({k: result.get(k, 0.0) for k in keys}, len(shard), device)
    if "mse" in reduced and "psnr" in reduced:
        from .vqvae_task import psnr_from_mse  # PSNR is not linear in the MSE: recompute it from the reduced MSE

        reduced["psnr"] = psnr_from_mse(reduced["mse"])
    return reduced


def train(task, train_set, val_set, config: TrainConfig, out_dir: str | os.PathLike, *,
          checkpoint: dict[str, Any] | None = None, device: str | torch.device = "cpu", progress: bool = True,
          num_workers: int = 0, tensorboard: bool = False,
          init_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``task`` on ``train_set`` for ``config.steps`` steps (continuing ``checkpoint`` if given; a new run
    starts from ``init_weights``, a state dict of the task's model, instead of the data-dependent init if given).

    Writes ``out_dir/latest.pt`` every ``checkpoint_every`` steps and at the end, ``metrics.jsonl``, and a PNG grid
    ``samples_stepN.png`` every ``sample_every`` steps; with ``tensorboard`` the same scalars and grids go to
    ``out_dir/tensorboard`` too (vqprior.monitor). Returns a summary dict (step, last metrics, status).
    In a distributed run (see the module docstring) every rank calls this with the same arguments.
    """
    from tqdm import tqdm

    device = torch.device(device)
    apply_precision_policy(config.precision)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    main = rank == 0
    if config.batch_size % world:
        raise UserError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                        f"{world} processes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    start_step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"], strict=True)
        start_step = int(checkpoint["step"])
    board = None
    if tensorboard and main:
        from .monitor import TensorBoardLog

        board = TensorBoardLog(out, start_step)
    if config.checkpoint_activations:
        if not hasattr(model, "checkpoint_activations"):
            raise UserError("--checkpoint-activations applies to PixelSNAIL models (pixels and priors) only")
        model.checkpoint_activations = True
    opt = make_optimizer(model, config.lr, (config.beta1, config.beta2))

    if val_set is not None and config.eval_limit and len(val_set) > config.eval_limit:
        val_set = torch.utils.data.Subset(val_set, range(config.eval_limit))
    sampler = StepBatchSampler(len(train_set), config.batch_size, config.seed, start_step, config.steps,
                               rank=rank, world_size=world)
    # Every DataLoader gets its own generator: creating an iterator otherwise draws a seed from the global RNG,
    # which drives dropout, and an eval or a resume would then shift the dropout masks of later steps.
    def loader_rng():
        return torch.Generator().manual_seed(config.seed)

    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, generator=loader_rng())
    eval_batch = max(config.batch_size, 32)
    val_loader = DataLoader(val_set, batch_size=eval_batch, shuffle=False, num_workers=num_workers,
                            generator=loader_rng()) if val_set is not None and len(val_set) else None

    if checkpoint is None:
        if init_weights is not None:
            model.load_state_dict(init_weights, strict=True)  # fine-tuning: the weights are already initialised
        else:
            first = to_device(next(iter(DataLoader(train_set, batch_sampler=[sampler.global_batch(0)],
                                                   generator=loader_rng()))), device)
            task.init_model(model, first)  # weight-norm data-dependent init on one batch (the same on every rank)
        ema = EMA(model, config.ema)
        if main:
            truncate_metrics(metrics_path, -1)
    else:
        opt.load_state_dict(checkpoint["optimizer"])
        ema = EMA(model, config.ema, checkpoint["ema"])
        if main:
            truncate_metrics(metrics_path, start_step)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        # Compiled around DDP (not inside it) so that DDP's bucketed all-reduce still overlaps the backward pass.
        train_model = compile_model(train_model, device)
    eval_model = task.build_model().to(device).eval()
    last_metrics: dict[str, float] = dict(checkpoint.get("metrics", {})) if checkpoint else {}
    sample_batch = next(iter(DataLoader(val_set if val_loader else train_set, batch_size=config.num_samples,
                                        generator=loader_rng())))

    def save(step: int) -> None:
        if not main:
            return
        payload = {"kind": task.kind, "config": {**task.config_dicts(), "train": config.to_dict()},
                   "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                   "step": step, "rng": rng_state(), "metrics": last_metrics, "train_seconds": timer.seconds}
        payload.update(task.extra_checkpoint())
        save_checkpoint(out / CHECKPOINT_NAME, payload)

    def run_eval(step: int, final: bool = False) -> None:
        eval_model.load_state_dict(ema.state_dict())
        if val_loader is not None:
            with torch.no_grad(), autocast(device, config.precision):
                if world > 1:
                    result = _reduce_eval(task, eval_model, val_set, eval_batch, num_workers, loader_rng, device)
                else:  # the final evaluation (often the whole held-out split) shows its own progress bar
                    batches = tqdm(val_loader, desc="final evaluation", unit="batch", leave=False,
                                   dynamic_ncols=True, disable=not (progress and final))
                    result = task.evaluate(eval_model, batches)
            last_metrics.update({f"eval_{k}": v for k, v in result.items()})
            if main:
                append_jsonl(metrics_path, {"step": step, "split": "eval", "train_seconds": timer.seconds, **result})
                if board:
                    board.scalars("eval", step, result)
                log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    def run_samples(step: int) -> None:
        if not main:
            return
        eval_model.load_state_dict(ema.state_dict())
        g = torch.Generator(device=device).manual_seed(config.seed + step)
        with torch.no_grad():
            images = task.grid(eval_model, to_device(sample_batch, device), g)
        nrow = getattr(task, "grid_nrow", None)
        save_grid(images, out / f"samples_step{step}.png", nrow=nrow)
        if board:
            board.image("samples", step, make_grid(images, nrow))

    if checkpoint is not None:
        set_rng_state(checkpoint["rng"])  # last, so that nothing above shifts the dropout masks of later steps
    bad_steps, skipped, status = 0, 0, "finished"
    step = start_step
    bar = tqdm(total=config.steps, initial=start_step, disable=not (progress and main), dynamic_ncols=True,
               unit="step")
    timer = StepTimer(checkpoint.get("train_seconds", 0.0) if checkpoint else 0.0)
    t_last, n_last, first_step = timer.seconds, 0, True

    def out_of_time() -> bool:  # --time-limit, judged on the step time spent so far (resumes included)
        return config.time_limit > 0 and timer.seconds >= config.time_limit * 60

    with StopFlag() as stop:
        # A run resumed past its --time-limit takes no step: it only evaluates, samples and saves (as a finished run).
        for batch in ([] if out_of_time() else loader):
            timer.start()
            if world > 1:
                # Ranks must draw different dropout masks, and a resumed run the masks of an uninterrupted one:
                # seed each step from (seed, step, rank) (one process keeps the saved RNG stream instead).
                torch.manual_seed(hash((config.seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
            lr = config.lr * config.lr_decay ** step
            for group in opt.param_groups:
                group["lr"] = lr
            batch = to_device(batch, device)
            train_model.train()
            with autocast(device, config.precision):
                loss, batch_metrics = task.loss(train_model, batch)
            # One all-reduce per step agrees the non-finite check, the stop signal and the time limit across ranks
            # (the limit is judged on the step time before this step, so this step still completes).
            flags = distributed.all_reduce_sum(torch.tensor(
                [float(not torch.isfinite(loss)), float(stop.signal is not None), float(out_of_time())],
                device=device))
            stop_now = bool(flags[1] > 0)
            time_up = bool(flags[2] > 0)
            skip = bool(flags[0] > 0)
            if skip:
                bad_steps += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, bad_steps)
            else:
                bad_steps = 0
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # After DDP's all-reduce the gradients are identical on every rank, so this check agrees too.
                skip = not bool(torch.isfinite(clip_and_measure(list(model.parameters()), config.grad_clip)))
            if skip:
                # A non-finite loss or gradient never reaches the weights: skip the step and count it.
                skipped += 1
                timer.stop()
                opt.zero_grad(set_to_none=True)
                if bad_steps >= config.max_bad_steps:
                    status = "diverged"
                    break
                step += 1
                bar.update(1)
                if stop_now:
                    status = "stopped"
                    break
                continue
            opt.step()
            ema.update(model, step)
            took = timer.stop()
            step += 1
            items = len(next(iter(batch.values()))) * world
            n_last += items
            bar.update(1)
            if first_step:
                # The first step of a process pays one-off costs (torch.compile's compilation, allocator warm-up):
                # report it once and keep it out of the images/s of the steady-state steps.
                if config.compile and main:
                    log.info("torch.compile: first step (compilation included) took %.1f s", took)
                t_last, n_last, first_step = timer.seconds, 0, False
            if step % 10 == 0 or step == config.steps:
                # n_last is 0 when a resumed process's first step lands on a logging step: report that step's rate.
                rate = n_last / max(timer.seconds - t_last, 1e-9) if n_last else items / max(took, 1e-9)
                t_last, n_last = timer.seconds, 0
                if world > 1:
                    batch_metrics = distributed.reduce_weighted_means(batch_metrics, 1, device)
                shown = {k: round(v, 4) for k, v in batch_metrics.items()}
                bar.set_postfix(**shown, img_s=f"{rate:.1f}")
                if main:
                    record = {"lr": lr, "items_per_s": rate, "skipped_steps": skipped,
                              "train_seconds": timer.seconds, **batch_metrics}
                    append_jsonl(metrics_path, {"step": step, "split": "train", **record})
                    if board:
                        board.scalars("train", step, record)
            if step % config.eval_every == 0 and step < config.steps:
                run_eval(step)
            if step % config.sample_every == 0 and step < config.steps:
                run_samples(step)
            if step % config.checkpoint_every == 0:
                save(step)
            if stop_now:
                status = "stopped"
                break
            if time_up:
                log.info("time limit of %g min of step time reached at step %d", config.time_limit, step)
                break  # status stays "finished": the final evaluation and samples follow
    bar.close()
    if status == "diverged":
        kept = (f"the last good checkpoint is kept in {out / CHECKPOINT_NAME}" if (out / CHECKPOINT_NAME).exists()
                else "no checkpoint had been written yet")
        raise UserError(f"training stopped: {bad_steps} consecutive non-finite losses at step {step}; {kept}")
    if status == "finished":
        run_eval(step, final=True)
        run_samples(step)
    save(step)
    if board:
        board.close()
    distributed.barrier()  # no rank returns (and leaves the group) before rank 0 has written the checkpoint
    return {"step": step, "status": status, "skipped_steps": skipped, "metrics": dict(last_metrics),
            "checkpoint": str(out / CHECKPOINT_NAME)}
