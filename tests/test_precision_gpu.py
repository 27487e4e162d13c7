"""The precision choices a GPU needs, checked on the CPU: the heads' float32 projection under
autocast, the training default and the bf16 refusal (torch.cuda's capability queries replaced), fp16 training with
its GradScaler state resumed exactly, and exact fp32 in extract-codes, decode, compress and decompress."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.errors import UserError
from vqprior.runtime.precision import check_precision, resolve_training_precision

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("head", ["pixels", "codes"])
def test_the_head_projects_in_float32_under_bf16_autocast(head):
    from conftest import tiny_model

    codes = {"num_codes": 8} if head == "codes" else {}
    model = tiny_model(dtype=torch.float32, head=head, height=8, width=8, **codes)
    x = torch.randint(0, 8, (2, 8, 8)) if head == "codes" else torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        params = model(x)
        features = []
        model.head.register_forward_hook(lambda module, args, out: features.append(args[0]))
        model(x)
    assert params.dtype == torch.float32  # not bf16-rounded means, scales, logits
    with torch.no_grad():  # the same projection of the same (bf16-computed) features outside autocast
        reference = model.head.out(torch.nn.functional.elu(features[0]).float())
    torch.testing.assert_close(params, reference, rtol=0, atol=0)


class FakeGpu:
    """torch.cuda's capability queries for one GPU of ``capability``, native bf16 from Ampere (8.0) on."""

    def __init__(self, monkeypatch, capability, keyword=True):
        native = capability >= (8, 0)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{capability[0]}{capability[1]}")
        if keyword:  # torch 2.11 / 2.14
            monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                                lambda including_emulation=True: native or including_emulation)
        else:  # a torch whose is_bf16_supported takes no keyword (and counts emulation)
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


@pytest.mark.parametrize("capability,expected", [((9, 0), "tf32"), ((8, 0), "tf32"), ((7, 5), "fp32"),
                                                 ((6, 0), "fp32")])
def test_training_defaults_to_tf32_on_ampere_and_later(capability, expected, monkeypatch):
    FakeGpu(monkeypatch, capability)
    assert resolve_training_precision("auto", CUDA) == expected
    assert resolve_training_precision("auto", torch.device("cpu")) == "fp32"
    for explicit in ("fp32", "bf16", "fp16", "tf32"):
        assert resolve_training_precision(explicit, CUDA) == explicit


@pytest.mark.parametrize("keyword", [True, False], ids=["including_emulation", "capability"])
def test_bf16_is_refused_where_the_gpu_only_emulates_it(keyword, monkeypatch):
    FakeGpu(monkeypatch, (7, 0), keyword)
    with pytest.raises(UserError, match="only emulates bfloat16.*fp16"):
        check_precision("bf16", CUDA)
    for fine in ("fp32", "tf32", "fp16"):
        check_precision(fine, CUDA)
    check_precision("bf16", torch.device("cpu"))
    FakeGpu(monkeypatch, (8, 0), keyword)
    check_precision("bf16", CUDA)


def test_the_train_commands_refuse_emulated_bf16_in_one_line(tmp_path, monkeypatch):
    FakeGpu(monkeypatch, (7, 0))
    result = run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "8", "--steps", "1",
                     "--preset", "tiny", "--quiet", "--precision", "bf16", "--device", "cuda", "--out",
                     tmp_path / "run")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "only emulates bfloat16" in errors[0]
    assert not (tmp_path / "run").exists()


def test_fp16_training_resumes_its_grad_scaler_exactly(tmp_path):
    from cli_support import train_pixel_run
    from vqprior.checkpoint import read_checkpoint

    train_pixel_run(tmp_path / "full", "--precision", "fp16", "--checkpoint-every", "2", steps=4, limit=16)
    train_pixel_run(tmp_path / "part", "--precision", "fp16", "--checkpoint-every", "2", steps=2, limit=16)
    half = read_checkpoint(tmp_path / "part" / "latest.pt")
    assert half["config"]["train"]["precision"] == "fp16"
    assert set(half["scaler"]) >= {"scale", "_growth_tracker"} and half["scaler"]["_growth_tracker"] == 2
    result = train_pixel_run(tmp_path / "part", "--resume", "--steps", "4", limit=16)
    assert "precision fp16" in result.output
    full, part = (read_checkpoint(tmp_path / run / "latest.pt") for run in ("full", "part"))
    assert full["scaler"] == part["scaler"] and full["scaler"]["_growth_tracker"] == 4
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    from vqprior.checkpoint import export_checkpoint

    export_checkpoint(tmp_path / "full" / "latest.pt", tmp_path / "small.pt")
    assert "scaler" not in read_checkpoint(tmp_path / "small.pt")  # training state stays out of exports


@pytest.fixture
def tf32_on():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_codes_and_coding_run_in_exact_fp32(bad_input_artefacts, tmp_path, tf32_on):
    """extract-codes, decode, compress and decompress switch TF32 off (cuDNN's default is on)."""
    from vqprior.checkpoint import load_model

    a = bad_input_artefacts
    codes = load_model(a["vq"], "cpu").encode(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    np.savez(tmp_path / "codes.npz", top=codes[0].numpy(), bottom=codes[1].numpy())
    np.save(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 256, (1, 3, 8, 8), dtype=np.uint8))
    commands = [
        ("extract-codes", "--vqvae", a["vq"], "--split", "test", "--limit", "4", "--out", tmp_path / "c.lmdb",
         "--quiet"),
        ("decode", "--vqvae", a["vq"], tmp_path / "codes.npz", "--out", tmp_path / "d.png"),
        ("compress", a["px"], tmp_path / "images.npy", "--out", tmp_path / "x.vqz"),
        ("decompress", a["px"], tmp_path / "x.vqz", "--out", tmp_path / "back.npy"),
    ]
    for command in commands:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        check_ok(run_cli(*command, "--device", "cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False), command


def test_bf16_is_judged_on_the_requested_gpu_not_the_current_one(monkeypatch):
    """cuda:1 an Ampere GPU, cuda:0 (the current device) an older one: bf16 runs on cuda:1, is refused on cuda:0."""
    capabilities = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[0 if device is None else torch.device(device).index or 0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "an older GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    check_precision("bf16", torch.device("cuda", 1))
    with pytest.raises(UserError, match="only emulates bfloat16"):
        check_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bfloat16_instructions_is_one_warning_line_naming_the_cost(native, monkeypatch,
                                                                                         caplog):
    import vqprior.runtime.precision as precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    precision._warn_emulated_cpu_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="vqprior"):
        check_precision("bf16", torch.device("cpu"))
        check_precision("bf16", torch.device("cpu"))  # once per process
        check_precision("fp32", torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records]
    if native:
        assert lines == []
    else:
        assert len(lines) == 1 and "\n" not in lines[0] and "emulated" in lines[0] and "slower" in lines[0]
    precision._warn_emulated_cpu_bf16.cache_clear()
