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
state is saved with the model, optimizer and EMA. A step's batch is ``batch_size * grad_accum`` images, run as
``grad_accum`` micro-batches whose gradients are summed (``acceleration.accumulate_gradients``).

Distributed (torchrun; ``distributed.init_distributed``): every rank builds the same model and runs the data-dependent
init on the same global batch 0; rank r trains on ``global_batch[r::N]`` and DDP averages the gradients, so N
processes train the model one process would. Rank 0 alone writes files; eval runs on rank shards and is reduced; the
stop flag, time limit and non-finite check are agreed by one all-reduce per step. VQ-VAE codebooks are kept identical
by the quantizer's own collectives, so DDP does not re-broadcast buffers.

Host syncs: a single-process step reads nothing back between logging steps (step_guard keeps metrics, guard and
counters on the device); a distributed step reads its all-reduced flags once, after the backward pass.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from vqprior.config import TrainConfig
from vqprior.errors import UserError
from vqprior.runtime.determinism import autotuned_convolutions
from vqprior.runtime.device import pin_memory
from vqprior.runtime.precision import grad_scaler, precision_policy
from vqprior.training import distributed
from vqprior.training.acceleration import (
    StepTimer,
    Throughput,
    accumulate_gradients,
    clip_and_measure,
    compile_model,
    make_optimizer,
)
from vqprior.training.outputs import RunOutputs, StepResult
from vqprior.training.run_state import (
    CHECKPOINT_NAME,
    EMA,
    StepBatchSampler,
    StopFlag,
    set_rng_state,
    to_device,
    truncate_metrics,
)
from vqprior.training.step_guard import NonFiniteGuard, step_unless

log = logging.getLogger(__name__)


def train(task, train_set, val_set, config: TrainConfig, out_dir: str | os.PathLike, *,
          checkpoint: dict[str, Any] | None = None, device: str | torch.device = "cpu", progress: bool = True,
          num_workers: int = 0, tensorboard: bool = False,
          init_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``task`` on ``train_set`` for ``config.steps`` steps (continuing ``checkpoint`` if given; a new run
    starts from ``init_weights``, a state dict of the task's model, instead of the data-dependent init if given).

    Writes ``out_dir/latest.pt`` every ``checkpoint_every`` steps and at the end, ``metrics.jsonl``, and a PNG grid
    ``samples_stepN.png`` every ``sample_every`` steps; with ``tensorboard`` the same scalars and grids go to
    ``out_dir/tensorboard`` too (vqprior.training.monitor). Returns a summary dict (step, last metrics, status).
    In a distributed run (see the module docstring) every rank calls this with the same arguments. PyTorch's precision
    and cuDNN switches are restored on return; the host allocator is the caller's (the CLI's) choice.
    """
    device = torch.device(device)
    with precision_policy(config.precision, device), autotuned_convolutions():
        run = TrainingRun(task, config, out_dir, device, progress=progress, num_workers=num_workers)
        # The order of these calls is the order in which they draw from the global RNG (model init, data-dependent
        # init, the eval copy's init): keep it, or runs stop being reproducible across versions.
        run.build_model(checkpoint, tensorboard)
        run.build_loaders(train_set, val_set)
        run.initialise(train_set, checkpoint, init_weights)
        status, step = run.loop()
        return run.finish(status, step)


class TrainingRun(RunOutputs):
    """One process's part of a training run: the model, its EMA and eval copies, the optimizer, the loaders, the
    step timer and what it writes (``RunOutputs``: checkpoint, metrics.jsonl, grids, TensorBoard). ``train``
    drives it."""

    def __init__(self, task, config: TrainConfig, out_dir: str | os.PathLike, device: torch.device, *,
                 progress: bool, num_workers: int):
        self.task, self.config, self.device = task, config, device
        self.progress, self.num_workers = progress, num_workers
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.ddp = None  # the DistributedDataParallel wrapper of a torchrun run
        self.main = self.rank == 0
        if config.batch_size % self.world:
            raise UserError(f"--batch-size {config.batch_size} (the global micro-batch) must be divisible by the "
                            f"{self.world} processes")
        self.out, self.metrics_path = Path(out_dir), Path(out_dir) / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        self.board, self.last_metrics, self.timer = None, {}, StepTimer()
        self.skipped = self.worst = 0  # the guard's counters as last read
        self.last_skipped = False

    def loader_rng(self) -> torch.Generator:
        # Every DataLoader gets its own generator: creating an iterator otherwise draws a seed from the global RNG,
        # which drives dropout, and an eval or a resume would then shift the dropout masks of later steps.
        return torch.Generator().manual_seed(self.config.seed)

    # ---- setting up ------------------------------------------------------------------------------------------------
    def build_model(self, checkpoint: dict[str, Any] | None, tensorboard: bool) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        self.model = self.task.build_model().to(self.device)
        self.start_step = 0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"], strict=True)
            self.start_step = int(checkpoint["step"])
        if tensorboard and self.main:
            from vqprior.training.monitor import TensorBoardLog

            self.board = TensorBoardLog(self.out, self.start_step)
        if config.checkpoint_activations:
            if not hasattr(self.model, "checkpoint_activations"):
                raise UserError("--checkpoint-activations applies to PixelSNAIL models (pixels and priors) only")
            self.model.checkpoint_activations = True
        self.opt = make_optimizer(self.model, config.lr, (config.beta1, config.beta2))
        self.scaler = grad_scaler(self.device, config.precision)  # fp16 only; a no-op otherwise
        self.guard = NonFiniteGuard(self.device)  # skipped steps (non-finite loss or gradient), counted there

    def build_loaders(self, train_set, val_set) -> None:
        config = self.config
        if val_set is not None and config.eval_limit and len(val_set) > config.eval_limit:
            val_set = torch.utils.data.Subset(val_set, range(config.eval_limit))
        self.val_set = val_set
        self.sampler = StepBatchSampler(len(train_set), config.effective_batch, config.seed, self.start_step,
                                        config.steps, rank=self.rank, world_size=self.world)
        pin = pin_memory(self.device)  # pinned batches: the non-blocking copies in to_device overlap the step
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=self.num_workers,
                                 persistent_workers=self.num_workers > 0, generator=self.loader_rng(), pin_memory=pin)
        self.eval_batch = max(config.batch_size, 32)
        self.val_loader = DataLoader(val_set, batch_size=self.eval_batch, shuffle=False, num_workers=self.num_workers,
                                     generator=self.loader_rng(), pin_memory=pin) \
            if val_set is not None and len(val_set) else None

    def initialise(self, train_set, checkpoint: dict[str, Any] | None,
                   init_weights: dict[str, torch.Tensor] | None) -> None:
        """Weights (data-dependent init, --init-from or the checkpoint's), optimizer and EMA state, the metrics
        file cut to the starting step, the wrapped training model, the eval copy and the RNG state."""
        config, model = self.config, self.model
        if checkpoint is None:
            if init_weights is not None:
                model.load_state_dict(init_weights, strict=True)  # fine-tuning: the weights are already initialised
            else:
                micro = self.sampler.global_batch(0)[:config.batch_size]  # one micro-batch: what memory allows
                first = to_device(next(iter(DataLoader(train_set, batch_sampler=[micro],
                                                       generator=self.loader_rng()))), self.device)
                self.task.init_model(model, first)  # weight-norm data-dependent init (the same batch on every rank)
        else:
            self.opt.load_state_dict(checkpoint["optimizer"])  # torch moves its state to the parameters' device
            if self.scaler.is_enabled() and "scaler" in checkpoint:
                self.scaler.load_state_dict(checkpoint["scaler"])
            self.ema = EMA(model, config.ema, checkpoint["ema"])
            self.last_metrics = dict(checkpoint.get("metrics", {}))
            self.timer = StepTimer(checkpoint.get("train_seconds", 0.0))
        if self.main:
            truncate_metrics(self.metrics_path, self.start_step if checkpoint is not None else -1)
        self.train_model = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer broadcast before every forward pass: the only buffers (VQ-VAE codebooks) are kept identical
            # on every rank by the quantizer's all-reduce (vqprior.models.quantizer), PixelSNAIL has none.
            self.train_model = self.ddp = DistributedDataParallel(model, device_ids=device_ids,
                                                                  broadcast_buffers=False)
        if checkpoint is None:  # after DDP broadcast rank 0's weights: every rank averages from the same start
            self.ema = EMA(model, config.ema)
        if config.compile:
            # Compiled around DDP (not inside it) so that DDP's bucketed all-reduce still overlaps the backward pass.
            self.train_model = compile_model(self.train_model, self.device)
        self.eval_model = self.task.build_model().to(self.device).eval()
        sample_source = self.val_set if self.val_loader else train_set
        self.sample_batch = next(iter(DataLoader(sample_source, batch_size=config.num_samples,
                                                 generator=self.loader_rng())))
        if checkpoint is not None:
            self.restore_rng(checkpoint)  # last, so that nothing above shifts the dropout masks of later steps

    def restore_rng(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's CPU generator and that of the training GPU; a CPU checkpoint resumed on a GPU seeds the
        CUDA generator from (seed, step), so the resumed run is reproducible too."""
        seed = hash((self.config.seed, self.start_step)) & 0x7FFF_FFFF
        set_rng_state(checkpoint["rng"], self.device, seed=seed)

    # ---- training --------------------------------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        """--time-limit, judged on the step time spent so far (resumes included)."""
        return self.config.time_limit > 0 and self.timer.seconds >= self.config.time_limit * 60

    def agree(self, stop: StopFlag, bad_loss: torch.Tensor) -> tuple[bool, bool, torch.Tensor]:
        """(stop signal, time limit reached, non-finite loss) on any rank. In one process the first two are host
        values and the flag stays on the device; a distributed run all-reduces the three together and reads the
        result (the step's one host sync): a non-finite loss on one rank skips the step on all, even where its
        gradient would be finite. The limit is judged on the step time before this step, so this step completes."""
        stop_now, time_up = stop.signal is not None, self.out_of_time()
        if self.world == 1:
            return stop_now, time_up, bad_loss
        flags = torch.cat([bad_loss.float().reshape(1),
                           torch.tensor([float(stop_now), float(time_up)], device=self.device)])
        agreed = distributed.all_reduce_sum(flags).tolist()
        return agreed[1] > 0, agreed[2] > 0, flags[0] > 0

    def train_step(self, batch: dict[str, torch.Tensor], step: int, stop: StopFlag) -> StepResult:
        """One optimisation step; a non-finite loss or gradient skips it on the device (vqprior.training.step_guard):
        the weights, optimizer state and EMA never see it. Reads nothing back from the device in one process."""
        config, opt, scaler = self.config, self.opt, self.scaler
        if self.world > 1:
            # Ranks must draw different dropout masks, and a resumed run the masks of an uninterrupted one:
            # seed each step from (seed, step, rank) (one process keeps the saved RNG stream instead).
            torch.manual_seed(hash((config.seed, step, self.rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        lr = config.learning_rate(step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = to_device(batch, self.device)
        self.train_model.train()
        opt.zero_grad(set_to_none=True)
        loss_sum, metrics = accumulate_gradients(self.task, self.train_model, batch, config, scaler, self.ddp)
        # Agreed once the backward passes are queued: a distributed run's read then waits for them, not the forward.
        stop_now, time_up, bad_loss = self.agree(stop, ~torch.isfinite(loss_sum))
        if scaler.is_enabled():
            scaler.unscale_(opt)  # clipping and the guard see the true gradient
        # After DDP's all-reduce the gradients are identical on every rank, so this check agrees too.
        norm = clip_and_measure(list(self.model.parameters()), config.grad_clip)
        skip = bad_loss | ~torch.isfinite(norm)
        step_unless(opt, skip)
        if scaler.is_enabled():
            scaler.update()  # backs the scale off after an overflow, grows it after a run of good steps
        self.ema.update(self.model, step, applied=(~skip).float())
        self.guard.record(skip, bad_loss if scaler.is_enabled() else skip)
        items = len(next(iter(batch.values()))) * self.world
        return StepResult(stop_now, time_up, items, lr, metrics)

    def loop(self) -> tuple[str, int]:
        """Steps until --steps, a stop signal, the time limit or too many non-finite losses; (status, step)."""
        from tqdm import tqdm

        config, step = self.config, self.start_step
        throughput = Throughput(self.timer)
        bar = tqdm(total=config.steps, initial=step, disable=not (self.progress and self.main), dynamic_ncols=True,
                   unit="step")
        with StopFlag() as stop, bar:
            # A run resumed past its --time-limit takes no step: it only evaluates, samples and saves.
            for batch in ([] if self.out_of_time() else self.loader):
                self.timer.start()
                result = self.train_step(batch, step, stop)
                step += 1
                # Reading the device inside the timed region charges the queued work to the step time.
                metrics = self.read_step(result) if self.reads_at(step) else None
                took = self.timer.stop()
                bar.update(1)
                first = throughput.add(result.items)
                if metrics is not None:
                    throughput.discount(self.new_skipped * result.items)  # items/s counts applied steps only
                    if self.worst >= config.max_bad_steps:
                        return "diverged", step
                if first and config.compile and self.main:
                    log.info("torch.compile: first step (compilation included) took %.1f s", took)
                if metrics is not None and not self.last_skipped:  # a skipped step logs and saves nothing
                    if step % 10 == 0 or step == config.steps:
                        self.log_train(step, result, metrics, throughput.rate(result.items, took), bar)
                    self.periodic(step)
                if result.stop:
                    return "stopped", step
                if result.time_up:
                    log.info("time limit of %g min of step time reached at step %d", config.time_limit, step)
                    return "finished", step  # the final evaluation and samples follow, as for a finished run
        return "finished", step

    def finish(self, status: str, step: int) -> dict[str, Any]:
        """The final evaluation and grid (finished runs), the last checkpoint, and the run's summary."""
        checkpoint = self.out / CHECKPOINT_NAME
        self.read_step(StepResult(False, False, 0, 0.0, {}))  # the guard's final counts
        if status == "diverged":
            kept = (f"the last good checkpoint is kept in {checkpoint}" if checkpoint.exists()
                    else "no checkpoint had been written yet")
            raise UserError(f"training stopped: {self.worst} consecutive non-finite losses by step {step}; {kept}")
        if status == "finished":
            self.evaluate(step, final=True)
            self.sample_grid(step)
        self.save(step)
        if self.board:
            self.board.close()
        distributed.barrier()  # no rank returns (and leaves the group) before rank 0 has written the checkpoint
        return {"step": step, "status": status, "skipped_steps": self.skipped, "metrics": dict(self.last_metrics),
                "checkpoint": str(checkpoint)}
