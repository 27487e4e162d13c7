"""Device-to-host syncs of the training step (issue 19, point 6), counted on the CPU: every Python-level way of
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


@pytest.mark.parametrize("case", [pixel_case, prior_case, vqvae_case], ids=["pixels", "prior", "vqvae"])
@pytest.mark.parametrize("precision,grad_clip", [("fp32", 0.0), ("fp32", 1.0), ("fp16", 1.0)])
def test_steps_between_logging_steps_do_not_sync(case, precision, grad_clip, tmp_path, monkeypatch):
    task, data = case()
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
    config = TrainConfig(steps=STEPS, batch_size=4, num_samples=2, eval_every=100, sample_every=100,
                         checkpoint_every=100, precision=precision, grad_clip=grad_clip)
    result = train(task, data, None, config, tmp_path, progress=False)
    assert result["step"] == STEPS and len(per_step) == STEPS
    assert max(len(reads) for reads in per_step) <= 1, per_step  # the bound
    assert per_step == [[]] * STEPS  # one process: nothing at all


def test_the_counter_sees_a_sync(monkeypatch):
    """The wrappers do catch the reads the old step made (``loss.item()``, ``bool(flag)``)."""
    seen = []
    for name in ("item", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: seen.append(_name) or
                            _real(self, *a))
    loss = torch.tensor(1.5)
    loss.item()
    bool(torch.isfinite(loss))
    assert seen == ["item", "__bool__"]
