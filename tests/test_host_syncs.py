"""Device-to-host syncs of the training step, counted on the CPU: every Python-level way of
reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool``/``float``/``int``/``index``, ``.cpu()``,
``.numpy()``) is wrapped by a counter, and the steps between logging steps of each train command's task may read at
most once each (one process reads nothing at all). On a GPU each of these reads waits for the queued kernels."""
from __future__ import annotations

import pytest
import torch

from vqprior.config import DataConfig, TrainConfig, model_config_from_preset
from vqprior.models.vqvae import vqvae_config_from_preset
from vqprior.training.loop import TrainingRun, train
from vqprior.training.pixel_task import PixelTask
from vqprior.training.prior_task import PriorTask
from vqprior.training.vqvae_task import VQVAETask

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
STEPS = 9  # logging happens at step 10: steps 1..9 are plain steps


class Items(torch.utils.data.Dataset):
    def __init__(self, **arrays):
        self.arrays = arrays

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def images(n: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def pixel_case():
    task = PixelTask(model_config_from_preset("tiny", height=8, width=8), DataConfig(dataset="synthetic"))
    return task, Items(image=images(32, 8), label=torch.zeros(32, dtype=torch.long))


def prior_case():
    config = model_config_from_preset("tiny", head="codes", num_codes=16, height=4, width=4, num_classes=3)
    codes = torch.randint(0, 16, (32, 4, 4), generator=torch.Generator().manual_seed(1))
    task = PriorTask(config, DataConfig(dataset="synthetic"), "top")
    return task, Items(top=codes, label=torch.arange(32) % 3)


def vqvae_case():
    task = VQVAETask(vqvae_config_from_preset("tiny", levels=2), DataConfig(dataset="synthetic"))
    return task, Items(image=images(32, 16))


def reads_per_step(task, data, config, out, monkeypatch) -> list[list[str]]:
    """Train, recording every host read (``READS``) made inside each ``TrainingRun.train_step`` call, step by
    step."""
    per_step, counting = [], [False]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if counting[0]:
                per_step[-1].append(name)
            return real(self, *args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_step = TrainingRun.train_step

    def step(self, *args, **kwargs):
        per_step.append([])
        counting[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            counting[0] = False

    monkeypatch.setattr(TrainingRun, "train_step", step)
    result = train(task, data, None, config, out, progress=False)
    assert result["step"] == config.steps and len(per_step) == config.steps
    return per_step


def plain_steps(**kw) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=4, num_samples=2, eval_every=100, sample_every=100,
                       checkpoint_every=100, **kw)


@pytest.mark.parametrize("case", [pixel_case, prior_case, vqvae_case], ids=["pixels", "prior", "vqvae"])
@pytest.mark.parametrize("precision,grad_clip", [("fp32", 0.0), ("fp32", 1.0), ("fp16", 1.0)])
def test_steps_between_logging_steps_do_not_sync(case, precision, grad_clip, tmp_path, monkeypatch):
    task, data = case()
    per_step = reads_per_step(task, data, plain_steps(precision=precision, grad_clip=grad_clip), tmp_path,
                              monkeypatch)
    assert max(len(reads) for reads in per_step) <= 1, per_step  # at most one read per step
    assert per_step == [[]] * STEPS  # one process: nothing at all


class SyncingTask:
    """A task whose loss is read on the host at every step, the way a loop would log it (``loss.item()``) and check
    it (``bool(torch.isfinite(loss))``)."""

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        loss, metrics = self.task.loss(model, batch)
        loss.item()
        bool(torch.isfinite(loss))
        return loss, metrics


def test_the_counter_sees_the_reads_a_step_makes(tmp_path, monkeypatch):
    """The counting of the test above, on a step that does read its loss: each step shows both reads."""
    task, data = pixel_case()
    per_step = reads_per_step(SyncingTask(task), data, plain_steps(), tmp_path, monkeypatch)
    assert per_step == [["item", "__bool__"]] * STEPS, per_step
