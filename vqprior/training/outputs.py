"""What a training run writes, as a mixin of ``loop.TrainingRun``: the checkpoint, held-out evaluations and sample
grids of the EMA weights, the step's metrics read from the device at logging steps, metrics.jsonl records and the
TensorBoard mirror. It reads the run's state (model, EMA, optimizer, timer, guard) and changes none of it."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vqprior.checkpoint import save_checkpoint
from vqprior.images import make_grid, save_grid
from vqprior.runtime.precision import autocast
from vqprior.training import distributed
from vqprior.training.run_state import CHECKPOINT_NAME, append_jsonl, rng_state, to_device
from vqprior.training.step_guard import read_values

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step hands the loop: flags on the host, metrics still on the device."""

    stop: bool  # SIGINT/SIGTERM received (on any rank)
    time_up: bool  # --time-limit reached before this step (on any rank)
    items: int  # images or code maps in the global batch
    lr: float
    metrics: dict[str, torch.Tensor]  # 0-d device tensors, read at logging steps only


class RunOutputs:
    def save(self, step: int) -> None:
        if not self.main:
            return
        payload = {"kind": self.task.kind, "config": {**self.task.config_dicts(), "train": self.config.to_dict()},
                   "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                   "step": step, "rng": rng_state(self.device), "metrics": self.last_metrics,
                   "train_seconds": self.timer.seconds}
        if self.scaler.is_enabled():
            payload["scaler"] = self.scaler.state_dict()
        payload.update(self.task.extra_checkpoint())
        save_checkpoint(self.out / CHECKPOINT_NAME, payload)

    def evaluate(self, step: int, final: bool = False) -> None:
        """Held-out metrics of the EMA weights: a metrics.jsonl record, a log line, TensorBoard scalars."""
        from tqdm import tqdm

        if self.val_loader is None:
            return
        self.eval_model.load_state_dict(self.ema.state_dict())
        with torch.no_grad(), autocast(self.device, self.config.precision):
            if self.world > 1:
                result = distributed.evaluate_sharded(self.task, self.eval_model, self.val_set, self.eval_batch,
                                                      self.num_workers, self.loader_rng, self.device)
            else:  # the final evaluation (often the whole held-out split) shows its own progress bar
                batches = tqdm(self.val_loader, desc="final evaluation", unit="batch", leave=False,
                               dynamic_ncols=True, disable=not (self.progress and final))
                result = self.task.evaluate(self.eval_model, batches)
        self.last_metrics.update({f"eval_{k}": v for k, v in result.items()})
        if self.main:
            append_jsonl(self.metrics_path, {"step": step, "split": "eval", "train_seconds": self.timer.seconds,
                                             **result})
            if self.board:
                self.board.scalars("eval", step, result)
            log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

    def sample_grid(self, step: int) -> None:
        """samples_stepN.png from the EMA weights (reconstructions for the VQ-VAE), seeded by (seed, step)."""
        if not self.main:
            return
        self.eval_model.load_state_dict(self.ema.state_dict())
        g = torch.Generator(device=self.device).manual_seed(self.config.seed + step)
        with torch.no_grad():
            images = self.task.grid(self.eval_model, to_device(self.sample_batch, self.device), g)
        nrow = getattr(self.task, "grid_nrow", None)
        save_grid(images, self.out / f"samples_step{step}.png", nrow=nrow)
        if self.board:
            self.board.image("samples", step, make_grid(images, nrow))

    def read_step(self, result: StepResult) -> dict[str, float]:
        """The step's metrics and the guard's counters, read from the device in one transfer (logging steps)."""
        values = read_values({**result.metrics, **{f"guard.{k}": v for k, v in self.guard.tensors().items()}})
        skipped = int(values.pop("guard.skipped"))
        self.new_skipped = skipped - self.skipped
        if self.new_skipped:
            log.warning("%d step(s) skipped since the last report (non-finite loss or gradient; %d in all)",
                        self.new_skipped, skipped)
        self.skipped, self.worst = skipped, int(values.pop("guard.worst"))
        self.last_skipped = bool(values.pop("guard.last"))
        values.pop("guard.run")
        return values

    def log_train(self, step: int, result: StepResult, metrics: dict[str, float], rate: float, bar) -> None:
        """A train record every 10 steps: lr, items/s, skipped steps, step time, the batch's metrics."""
        if self.world > 1:
            metrics = distributed.reduce_weighted_means(metrics, 1, self.device)
        bar.set_postfix(**{k: round(v, 4) for k, v in metrics.items()}, img_s=f"{rate:.1f}")
        if self.main:
            record = {"lr": result.lr, "effective_batch": self.config.effective_batch, "items_per_s": rate,
                      "skipped_steps": self.skipped,
                      "train_seconds": self.timer.seconds, **metrics}
            append_jsonl(self.metrics_path, {"step": step, "split": "train", **record})
            if self.board:
                self.board.scalars("train", step, record)

    def reads_at(self, step: int) -> bool:
        """Whether ``step`` reads the device (logging, eval, grid or checkpoint step)."""
        c = self.config
        return any(step % every == 0 for every in (10, c.eval_every, c.sample_every, c.checkpoint_every)) \
            or step == c.steps

    def periodic(self, step: int) -> None:
        """Eval, sample grid and checkpoint when ``step`` is one of their multiples (the last step's eval and grid
        are the final ones, written by ``finish``)."""
        config = self.config
        if step % config.eval_every == 0 and step < config.steps:
            self.evaluate(step)
        if step % config.sample_every == 0 and step < config.steps:
            self.sample_grid(step)
        if step % config.checkpoint_every == 0:
            self.save(step)
