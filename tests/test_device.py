"""Device handling for GPUs, checked on the CPU with torch.cuda's queries replaced: ``--device``
strings checked before any work (cuda:N beyond the GPUs present is one ``Error:`` line), pinned DataLoader memory
when training on CUDA, and cuDNN's autotuner on for training unless deterministic."""
from __future__ import annotations

import pytest
import torch

from cli_support import run_cli
from vqprior.config import DataConfig, TrainConfig, model_config_from_preset
from vqprior.data.loader import load_image_dataset
from vqprior.errors import UserError
from vqprior.runtime.determinism import deterministic
from vqprior.runtime.device import check_device
from vqprior.training.loop import TrainingRun
from vqprior.training.pixel_task import PixelTask


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_strings_are_checked(two_gpus):
    assert check_device("cpu") == torch.device("cpu")
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="2 CUDA device.*cuda:0 to cuda:1"):
        check_device("cuda:2")
    for bad in ("cuda:x", "cuda:-1", "cpu:1", "meta", "mps", "tpu", "CUDA"):
        with pytest.raises(UserError, match="unknown device"):
            check_device(bad)


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        check_device("cuda:0")


@pytest.mark.parametrize("command", [
    ["train-pixels", "--dataset", "sample", "--steps", "1", "--quiet", "--out", "{tmp}/run"],
    ["extract-codes", "--vqvae", "{tmp}/missing.pt", "--out", "{tmp}/codes.lmdb"],
])
def test_a_gpu_index_beyond_the_machine_is_one_error_line_before_any_work(command, two_gpus, tmp_path):
    result = run_cli(*[a.format(tmp=tmp_path) for a in command], "--device", "cuda:5")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: device 'cuda:5' requested but this machine has 2 CUDA device(s): cuda:0 to cuda:1"]
    assert list(tmp_path.iterdir()) == []


def loaders_for(device: str, tmp_path):
    data = load_image_dataset("sample", "train", image_size=8, limit=8)
    task = PixelTask(model_config_from_preset("tiny", height=8, width=8), DataConfig(image_size=8))
    run = TrainingRun(task, TrainConfig(steps=1, batch_size=4), tmp_path, torch.device(device), progress=False,
                      num_workers=0)
    run.start_step = 0
    run.build_loaders(data, data)
    return run.loader, run.val_loader


def test_batches_are_pinned_for_a_gpu_only(tmp_path):
    assert all(loader.pin_memory for loader in loaders_for("cuda:0", tmp_path))  # built, not iterated: no GPU needed
    assert not any(loader.pin_memory for loader in loaders_for("cpu", tmp_path))


def test_training_turns_the_cudnn_autotuner_on_unless_deterministic(tmp_path, monkeypatch):
    """On during the training steps (off under deterministic mode), and the previous setting restored after."""
    from cli_support import train_pixel_run

    seen = []
    real = TrainingRun.train_step

    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainingRun, "train_step", spy)
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        train_pixel_run(tmp_path / "run", steps=1, limit=8)
        assert seen == [True] and torch.backends.cudnn.benchmark is False
        with deterministic():
            train_pixel_run(tmp_path / "run-deterministic", steps=1, limit=8)
            assert seen == [True, False]
    finally:
        torch.backends.cudnn.benchmark = saved


DRIVER_TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). "
                  "Please update your GPU driver.")


@pytest.fixture
def old_driver(monkeypatch, tmp_path):
    """A CUDA 13 build of torch on a machine whose NVIDIA driver is too old for it, as torch reports it."""
    import warnings

    import vqprior.runtime.device as device_module

    def unavailable():
        warnings.warn(DRIVER_TOO_OLD)
        return False

    driver = tmp_path / "nvidia-version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    monkeypatch.setattr(device_module, "NVIDIA_DRIVER_FILE", str(driver))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return driver


def test_auto_on_a_gpu_torch_cannot_use_says_so_in_one_warning_line(old_driver, capsys):
    from vqprior.commands.common import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: CUDA is present but unusable: NVIDIA driver 535.104.05")
    assert f"torch {torch.__version__} built for CUDA 13.0" in lines[0] and "too old" in lines[0]
    assert lines[0].endswith("running on the CPU")


def test_cuda_on_a_gpu_torch_cannot_use_is_one_error_line(old_driver, tmp_path):
    result = run_cli("train-pixels", "--dataset", "sample", "--steps", "1", "--quiet", "--out", tmp_path / "run",
                     "--device", "cuda")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "NVIDIA driver 535.104.05" in errors[0] and "built for CUDA 13.0" in errors[0]


def test_no_warning_on_a_machine_without_a_gpu_driver(old_driver, monkeypatch, capsys):
    from vqprior.commands.common import resolve_device
    from vqprior.runtime.device import cuda_unusable

    old_driver.unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_unusable() is None and resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose: silence too
    assert cuda_unusable() is None
