"""Shared test fixtures: tiny model configs and the optional real data in ../shared/data."""
import os
from pathlib import Path

import pytest
import torch

from vqprior.config import model_config_from_preset
from vqprior.pixelsnail import PixelSNAIL

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The real CIFAR-10 / MNIST npz folder when present (never required)."""
    for candidate in (os.environ.get("VQPRIOR_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


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
