"""``--deterministic`` (vqprior.runtime.determinism): the commands where results depend on kernel choices take it and it
sets torch's switches before the command body runs (cuBLAS workspace included); the lossless coder always runs in
deterministic mode; the context manager restores what it found; and the CLI's ``sample`` / ``complete
--compile`` draw what the eager cached sampler draws."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.commands.cli import cli
from vqprior.runtime.determinism import deterministic, is_deterministic, set_deterministic

COMMANDS = ("train-pixels", "train-prior", "train-vqvae", "sample", "complete", "evaluate", "extract-codes")


@pytest.fixture
def restore_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


@pytest.fixture
def pixel_run(pixel_run):
    """The session's tiny pixel run (conftest.py): its checkpoint."""
    return pixel_run.checkpoint


@pytest.mark.parametrize("name", COMMANDS)
def test_the_commands_take_deterministic(name):
    assert "--deterministic" in [o for p in cli.commands[name].params for o in p.opts]


def test_deterministic_sets_the_switches_before_the_body(pixel_run, tmp_path, restore_switches, monkeypatch):
    seen = {}
    import vqprior.sampling.generate

    real = vqprior.sampling.generate.generate

    def spy(*args, **kwargs):
        seen.update(on=is_deterministic(), benchmark=torch.backends.cudnn.benchmark,
                    cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return real(*args, **kwargs)

    monkeypatch.setattr(vqprior.sampling.generate, "generate", spy)
    torch.backends.cudnn.benchmark = True
    check_ok(run_cli("sample", pixel_run, "--num", "2", "--deterministic", "--save-array", tmp_path / "a.npy",
                     "--device", "cpu"))
    assert seen == {"on": True, "benchmark": False, "cublas": ":4096:8"}


def test_without_the_flag_nothing_changes(pixel_run, tmp_path, restore_switches):
    check_ok(run_cli("sample", pixel_run, "--num", "2", "--save-array", tmp_path / "a.npy", "--device", "cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_the_context_restores_the_switches(restore_switches):
    set_deterministic(False)
    torch.backends.cudnn.benchmark = True
    with deterministic():
        assert is_deterministic() and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic


def test_the_coder_runs_deterministic(monkeypatch, restore_switches):
    pytest.importorskip("constriction")
    from conftest import images_for, pixel_model
    from vqprior.compress import api, compress_images, decompress_images

    seen = []
    real = api.code_pixels

    def spy(*args, **kwargs):
        seen.append((is_deterministic(), torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "code_pixels", spy)
    model = pixel_model(3)
    x = images_for(model, 2)
    assert torch.equal(decompress_images(model, compress_images(model, x)[0])[0], x)
    assert seen == [(True, 1), (True, 1)] and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("command", ["sample", "complete"])
def test_compile_draws_what_the_eager_cached_sampler_draws(pixel_run, tmp_path, monkeypatch, command):
    """The CLI's --compile path with the eager backend standing in for inductor (compiling C++ takes a minute)."""
    import vqprior.sampling.sampler

    asked = []
    real = vqprior.sampling.sampler._compile_options

    def eager_backend(compile, device):
        asked.append(compile)
        options = real(compile, device)
        return None if options is None else {"backend": "eager"}

    monkeypatch.setattr(vqprior.sampling.sampler, "_compile_options", eager_backend)
    image = tmp_path / "in.png"
    check_ok(run_cli("sample", pixel_run, "--num", "1", "--out", image, "--device", "cpu"))
    outs = []
    for extra in (["--compile"], []):
        out = tmp_path / f"{command}{len(extra)}.png"
        args = ["--num", "2", "--seed", "4", "--out", out, "--device", "cpu", "--quiet", *extra]
        if command == "complete":
            args += ["--image", image, "--keep-rows", "3"]
        check_ok(run_cli(command, pixel_run, *args))
        from PIL import Image

        outs.append(np.asarray(Image.open(out)))
    assert asked == [False, True, False]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_the_cli_builds_its_generator_on_the_models_device(pixel_run, tmp_path, monkeypatch):
    """sample / complete make their own generator with --device, where the model is loaded: the check in
    vqprior.sampling.sampler.check_generator sees the same device on both sides."""
    import vqprior.sampling.sampler

    seen = []
    real = vqprior.sampling.sampler.check_generator

    def spy(generator, device):
        seen.append((generator.device, torch.device(device)))
        return real(generator, device)

    monkeypatch.setattr(vqprior.sampling.sampler, "check_generator", spy)
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "in.png")
    check_ok(run_cli("sample", pixel_run, "--num", "2", "--save-array", tmp_path / "a.npy", "--device", "cpu"))
    check_ok(run_cli("complete", pixel_run, "--image", tmp_path / "in.png", "--keep-rows", "2", "--num", "1",
                     "--out", tmp_path / "c.png", "--device", "cpu"))
    assert len(seen) == 2 and all(g == m for g, m in seen)


def test_a_process_that_multiplies_first_then_enters_deterministic_mode_has_the_workspace_set(tmp_path):
    """cuBLAS takes its workspace setting at the process's first GPU matrix product: importing vqprior sets it, so
    that a product before deterministic mode (compress encodes with the VQ-VAE first) already runs with it."""
    import subprocess
    import sys

    script = ("import os, torch\n"
              "from vqprior.runtime.determinism import deterministic\n"
              "seen = os.environ.get('CUBLAS_WORKSPACE_CONFIG')\n"
              "x = torch.ones(4, 4)\n"
              "x @ x\n"
              "with deterministic():\n"
              "    x @ x\n"
              "print(seen)\n")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [":4096:8"]


def test_deterministic_mode_after_cuda_work_without_the_workspace_is_one_line_error(monkeypatch, restore_switches):
    from vqprior.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(UserError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 before the process's first CUDA work"):
        set_deterministic(True)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_deterministic(True)
    assert is_deterministic()
