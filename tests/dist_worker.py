"""One rank of the 2-process CPU (gloo) checks in tests/test_distributed_guard.py; not a test module itself.

    python tests/dist_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR MODE

MODE ``quantizer``: a few codebook updates where rank 1's encoder output is non-finite at the second one.
MODE ``train``: a 4-step VQ-VAE training run through the real loop (DDP) where rank 1's batch is non-finite at step 2.
MODE ``ema``: a 1-step run whose init differs on rank 1 (as GPU kernels may in the last bits): the EMA each rank starts
from, and whether the step's flags were agreed after the backward pass (gradients present).
Each rank writes what it ended with to OUT_DIR/rankR.pt, so the test can compare the ranks.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vqprior.config import DataConfig, TrainConfig
from vqprior.models.quantizer import VectorQuantizer
from vqprior.models.vqvae import vqvae_config_from_preset
from vqprior.training.vqvae_task import VQVAETask

TIMEOUT = timedelta(seconds=120)  # a collective that never completes fails the rank instead of hanging it


def quantizer_run(rank: int) -> dict:
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=8, dim=4, decay=0.5, dead_code_threshold=1.0)
    history = []
    for step in range(4):
        z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10 * step + rank))
        if step == 1 and rank == 1:
            z[0, 0, 0, 0] = float("nan")
        out = q(z)
        q.update_codebook(out["inputs"], out["codes"])
        history.append({k: v.clone() for k, v in q.state_dict().items()})
    return {"history": history}


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        self.images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


class PoisonedOnRank1(VQVAETask):
    """The VQ-VAE task whose batch (as [-1, 1] floats) is non-finite on rank 1 at step 2."""

    calls = 0

    def loss(self, model, batch):
        self.calls += 1
        images = batch["image"].float() / 127.5 - 1.0
        if self.calls == 2 and dist.get_rank() == 1:
            images[0] = float("nan")
        return super().loss(model, {"image": images})


def train_run(rank: int, out: Path) -> dict:
    from vqprior.training.loop import TrainingRun

    task = PoisonedOnRank1(vqvae_config_from_preset("tiny", levels=2), DataConfig(dataset="synthetic"))
    config = TrainConfig(steps=4, batch_size=4, num_samples=2, eval_every=100, sample_every=100,
                         checkpoint_every=100, ema=0.0, lr=3e-3)
    run = TrainingRun(task, config, out / "run", torch.device("cpu"), progress=False, num_workers=0)
    data = Images()
    run.build_model(None, tensorboard=False)
    run.build_loaders(data, None)
    run.initialise(data, None, None)
    status, step = run.loop()
    run.read_step(run_result_placeholder())
    return {"status": status, "step": step, "skipped": run.skipped, "state": run.model.state_dict(),
            "broadcast_buffers": run.train_model.broadcast_buffers}


class InitDiffersOnRank1(VQVAETask):
    def init_model(self, model, batch):
        super().init_model(model, batch)
        if dist.get_rank() == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)


def ema_run(rank: int, out: Path) -> dict:
    from vqprior.training.loop import TrainingRun

    task = InitDiffersOnRank1(vqvae_config_from_preset("tiny", levels=2), DataConfig(dataset="synthetic"))
    config = TrainConfig(steps=1, batch_size=4, num_samples=2, eval_every=100, sample_every=100,
                         checkpoint_every=100)
    run = TrainingRun(task, config, out / "run", torch.device("cpu"), progress=False, num_workers=0)
    data = Images()
    run.build_model(None, tensorboard=False)
    run.build_loaders(data, None)
    run.initialise(data, None, None)
    start = {k: v.clone() for k, v in run.ema.state_dict().items()}
    grads_at_agree, agree = [], run.agree

    def spy(*args):
        grads_at_agree.append(all(p.grad is not None for p in run.model.parameters() if p.requires_grad))
        return agree(*args)

    run.agree = spy
    run.loop()
    return {"ema_start": start, "grads_at_agree": grads_at_agree}


def run_result_placeholder():
    from vqprior.training.outputs import StepResult

    return StepResult(False, False, 0, 0.0, {})


def main():
    rank, world, store, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        runs = {"quantizer": lambda: quantizer_run(rank), "train": lambda: train_run(rank, out),
                "ema": lambda: ema_run(rank, out)}
        result = runs[mode]()
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
