"""Resuming on a GPU, proved on the CPU: every piece of restored state ends up on the
training device (the ``meta`` device stands in for a GPU: a checkpoint is read to the CPU, so a tensor left there
shows up as a CPU tensor, and the EMA's fused update refuses to mix devices), and the RNG state saved and restored is
the training device's only (torch.cuda's generator functions are replaced by recorders)."""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from vqprior.checkpoint import read_checkpoint
from vqprior.config import DataConfig, TrainConfig, model_config_from_preset
from vqprior.data.loader import load_image_dataset
from vqprior.training.loop import TrainingRun, train
from vqprior.training.pixel_task import PixelTask
from vqprior.training.run_state import EMA, rng_state, set_rng_state

META = torch.device("meta")


def test_ema_restored_from_a_cpu_checkpoint_lives_on_the_training_device():
    model = torch.nn.Linear(3, 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # what a checkpoint read to the CPU holds
    model.to(META)
    ema = EMA(model, 0.9, saved)
    assert {t.device for t in ema.state_dict().values()} == {META}
    ema.update(model, step=5)  # mixed devices would raise in the fused lerp


def test_ema_update_with_a_skipped_step_leaves_the_average_untouched():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100, applied=torch.tensor(0.0))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    ema.update(model, step=100, applied=torch.tensor(1.0))
    reference = EMA(model, 0.5, before)
    reference.update(model, step=100)
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in ema.state_dict().items())


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory):
    """A 2-step CPU run of the tiny pixel model: (task, train set, config, checkpoint as read for a resume)."""
    out = tmp_path_factory.mktemp("run")
    data = load_image_dataset("sample", "train", image_size=8, limit=16)
    task = PixelTask(model_config_from_preset("tiny", height=8, width=8), DataConfig(image_size=8))
    config = TrainConfig(steps=2, batch_size=4, num_samples=2, eval_every=100, sample_every=100)
    train(task, data, None, config, out, progress=False)
    return task, data, config, read_checkpoint(out / "latest.pt", "pixels"), out


def test_every_restored_tensor_lands_on_the_training_device(pixel_checkpoint):
    task, data, config, checkpoint, out = pixel_checkpoint
    assert all(t.device.type == "cpu" for t in checkpoint["ema"].values())
    run = TrainingRun(task, config, out, META, progress=False, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading into meta parameters is a no-op copy, and torch says so
        run.build_model(checkpoint, tensorboard=False)
        run.build_loaders(data, None)
        run.initialise(data, checkpoint, None)
    restored = {**{f"model.{k}": v for k, v in run.model.state_dict().items()},
                **{f"ema.{k}": v for k, v in run.ema.state_dict().items()},
                **{f"eval.{k}": v for k, v in run.eval_model.state_dict().items()},
                **{f"optimizer.{i}.{k}": v for i, s in enumerate(run.opt.state.values()) for k, v in s.items()
                   if isinstance(v, torch.Tensor)}}
    assert restored and not [k for k, v in restored.items() if v.device != META]
    assert len(run.opt.state) == len(list(run.model.parameters()))


class FakeCuda:
    """torch.cuda's generator functions on a machine with ``count`` GPUs, recording what is set."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.set, self.seeded, self.read = count, {}, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "manual_seed", self.seeded.append)
        for name in ("get_rng_state_all", "set_rng_state_all"):  # every visible GPU: never wanted
            monkeypatch.setattr(torch.cuda, name, self.refuse)

    def state_of(self, index: int) -> torch.Tensor:
        return torch.full((8,), index, dtype=torch.uint8)

    def get_rng_state(self, device="cuda"):
        index = torch.device(device, 0).index if isinstance(device, str) else int(device)
        self.read.append(index)
        return self.state_of(index)

    def set_rng_state(self, state, device="cuda"):
        index = int(device)
        assert index < self.count, f"cuda:{index} does not exist here"
        self.set[index] = state.clone()

    def refuse(self, *args):
        raise AssertionError("the state of every visible GPU was read or set")


def test_only_the_training_devices_generator_is_saved(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=4)
    state = rng_state(torch.device("cuda", 2))
    assert cuda.read == [2] and torch.equal(state["cuda"], cuda.state_of(2))
    assert "cuda" not in rng_state(torch.device("cpu"))
    assert cuda.read == [2]  # a CPU run never touches a GPU


def test_a_checkpoint_resumes_on_a_machine_with_fewer_gpus(monkeypatch):
    saved = {"torch": torch.get_rng_state(), "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]}
    cuda = FakeCuda(monkeypatch, count=1)  # an older checkpoint holds get_rng_state_all() of 4 GPUs
    set_rng_state(saved, torch.device("cuda", 0))
    assert list(cuda.set) == [0] and torch.equal(cuda.set[0], saved["cuda"][0])
    cuda.set.clear()
    set_rng_state({"torch": saved["torch"], "cuda": saved["cuda"][3]}, torch.device("cuda", 0))  # the current format
    assert torch.equal(cuda.set[0], saved["cuda"][3]) and not cuda.seeded


def test_a_cpu_checkpoint_resumed_on_a_gpu_seeds_the_cuda_generator(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=1)
    cpu_state = {"torch": torch.get_rng_state()}
    set_rng_state(cpu_state, torch.device("cuda", 0), seed=1234)
    set_rng_state(cpu_state, torch.device("cuda", 0), seed=1234)
    assert cuda.seeded == [1234, 1234] and not cuda.set
    set_rng_state(cpu_state, torch.device("cpu"), seed=99)
    assert cuda.seeded == [1234, 1234]  # a CPU resume leaves CUDA alone


def test_a_resumed_cpu_run_seeds_cuda_from_its_seed_and_step(pixel_checkpoint, monkeypatch):
    """The loop's restore: the CUDA seed is a function of (seed, step) only: the same on every resume of a run, and
    another for another seed or another step (so resumed runs do not share their random numbers)."""
    task, data, config, checkpoint, out = pixel_checkpoint
    cuda = FakeCuda(monkeypatch, count=1)
    step = checkpoint["step"]
    for seed, start in ((config.seed, step), (config.seed, step), (config.seed + 1, step), (config.seed, step + 1)):
        run = TrainingRun(task, replace(config, seed=seed), out, torch.device("cuda", 0), progress=False,
                          num_workers=0)
        run.start_step = start
        run.restore_rng(checkpoint)
    first, again, other_seed, other_step = cuda.seeded
    assert first == again and len({first, other_seed, other_step}) == 3, cuda.seeded
