"""Shared test fixtures: tiny model configs and the optional real data in ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

from vqprior.config import model_config_from_preset
from vqprior.models.pixelsnail import PixelSNAIL

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real CIFAR-10 / MNIST npz folder when present (never required)."""
    for candidate in (os.environ.get("VQPRIOR_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def load_script(name: str):
    """A module of scripts/ (not a package), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> PixelSNAIL:
    """A tiny PixelSNAIL in eval mode with non-trivial weight-norm scales and biases."""
    torch.manual_seed(seed)
    defaults = dict(height=5, width=5)
    defaults.update(overrides)
    model = PixelSNAIL(model_config_from_preset("tiny", **defaults)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "class_embedding" in name:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: thread start-up costs more than it saves, and two busy threads on a shared 2-core machine are
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def bad_input_artefacts(tmp_path_factory):
    """The tiny real artefacts the bad-input tables (tests/test_bad_inputs_*.py) point at, built once."""
    from bad_inputs import build_artefacts

    return build_artefacts(tmp_path_factory.mktemp("artefacts"))


@pytest.fixture(scope="session")
def levels_pipeline(tmp_path_factory):
    """A tiny 3-level VQ-VAE pipeline (tests/cli_support.py ``build_levels_pipeline``), built once."""
    from cli_support import build_levels_pipeline

    return build_levels_pipeline(tmp_path_factory.mktemp("levels"))


# ---- tiny training runs ------------------------------------------------------------------------------------------
class ImageSet(torch.utils.data.Dataset):
    """Random but fixed 8x8 RGB images with labels."""

    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def tiny_pixel_task(**overrides):
    from vqprior.config import DataConfig
    from vqprior.training.pixel_task import PixelTask

    cfg = model_config_from_preset("tiny", **{"height": 8, "width": 8, "dropout": 0.2, **overrides})
    return PixelTask(cfg, DataConfig(dataset="synthetic"))


def tiny_train_config(steps, **kw):
    from vqprior.config import TrainConfig

    base = dict(steps=steps, batch_size=4, eval_every=1000, sample_every=1000, checkpoint_every=3, num_samples=2,
                seed=7, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def train_tiny(out, steps, checkpoint=None, task=None, **kw):
    """Train a tiny pixel model on ``ImageSet`` for ``steps`` steps into ``out`` (TrainConfig fields in ``kw``)."""
    from vqprior.training.loop import train

    return train(task or tiny_pixel_task(), ImageSet(), ImageSet(8, seed=1), tiny_train_config(steps, **kw), out,
                 checkpoint=checkpoint, progress=False)


class NaNTask:
    """Wraps a task so that the loss becomes NaN from a given step on."""

    def __init__(self, task, bad_from):
        self.task, self.bad_from, self.calls = task, bad_from, 0
        self.kind = task.kind

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = self.task.loss(model, batch)
        return (loss * float("nan") if self.calls > self.bad_from else loss), metrics
