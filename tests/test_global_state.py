"""Library calls leave process-wide state as they found it: ``train()`` and ``generate()`` restore PyTorch's
precision and cuDNN switches (the CLI applies a command's settings once, at its entry)."""
import pytest
import torch

from conftest import tiny_model, train_tiny
from vqprior.sampling.generate import generate


def _switches():
    return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())


@pytest.fixture
def unusual_switches():
    """Settings no policy of ours would choose, so that any change shows; torch's own restored afterwards."""
    saved = _switches()
    torch.backends.cudnn.benchmark = True  # train() turns autotuning on for its run, then must turn it back
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    yield _switches()
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:3]
    torch.set_float32_matmul_precision(saved[3])


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_train_restores_the_switches(unusual_switches, tmp_path, precision):
    train_tiny(tmp_path / "run", 1, precision=precision)
    assert _switches() == unusual_switches


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generate_restores_the_switches(unusual_switches, precision):
    torch.backends.cudnn.benchmark = False
    before = _switches()
    generate(tiny_model(dtype=torch.float32), 2, precision=precision, generator=torch.Generator().manual_seed(0))
    assert _switches() == before
