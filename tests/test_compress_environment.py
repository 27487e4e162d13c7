"""Compressed files record what computed their probabilities (device kind, CPU kernels or GPU model, CUDA, cuDNN,
torch) and are refused *before* decoding where those cannot be recomputed exactly; older files, whose record has
no GPU identity, still decode on the CPU. The device identity is monkeypatched to stand in for GPUs."""
from __future__ import annotations

import pytest
import torch

from conftest import images_for, pixel_model
from vqprior.compress import CompressedFileError, api, compress_images, container, decompress_images, unpack

pytest.importorskip("constriction")

H200 = {"torch": torch.__version__, "device": "cuda", "gpu": "NVIDIA_H200", "cuda": "12.8", "cudnn": "91002"}


@pytest.fixture(scope="module")
def model_and_images():
    model = pixel_model(3)
    return model, images_for(model, 2)


def pretend(monkeypatch, identity: dict) -> None:
    """This process's device identity, as the container sees it."""
    monkeypatch.setattr(container, "device_identity", lambda device: dict(identity))


def no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(api, "Decoder", refuse)


def with_environment(data: bytes, text: str) -> bytes:
    header = unpack(data)
    header.environment = text
    return container.pack(header)


def test_a_file_records_the_device_identity(model_and_images):
    model, x = model_and_images
    text = unpack(compress_images(model, x)[0]).environment
    assert container.parse_environment(text) == container.device_identity(torch.device("cpu"))
    assert text == f"torch {torch.__version__} cpu {torch.backends.cpu.get_cpu_capability()} constriction " \
                   f"{container._constriction_version()}"  # the CPU record is what older files hold


def test_a_file_made_on_a_gpu_is_refused_on_the_cpu_before_decoding(model_and_images, monkeypatch):
    model, x = model_and_images
    pretend(monkeypatch, H200)
    data = compress_images(model, x)[0]  # (computed on the CPU, recorded as made on an H200)
    assert unpack(data).environment.startswith(f"torch {torch.__version__} cuda gpu=NVIDIA_H200 cuda=12.8 cudnn=91002 ")
    monkeypatch.undo()
    no_decoding(monkeypatch)
    with pytest.raises(CompressedFileError, match=r"compressed on CUDA \(NVIDIA H200, CUDA 12.8") as e:
        decompress_images(model, data, where="f.vqz")
    assert "\n" not in str(e.value) and "damaged" not in str(e.value) and str(e.value).startswith("f.vqz")


@pytest.mark.parametrize("change,what", [
    (dict(gpu="NVIDIA_A100-SXM4-80GB"), "GPU"),
    (dict(cuda="12.4"), "CUDA"),
    (dict(cudnn="90100"), "cuDNN"),
    (dict(torch="2.11.0+cu128"), "torch"),
    (dict(device="cpu", cpu="AVX2"), "device"),
])
def test_another_gpu_or_software_is_refused_before_decoding(model_and_images, monkeypatch, change, what):
    model, x = model_and_images
    pretend(monkeypatch, H200)
    data = compress_images(model, x)[0]
    pretend(monkeypatch, dict(H200, **change))
    no_decoding(monkeypatch)
    with pytest.raises(CompressedFileError, match=f"other {what}"):
        decompress_images(model, data)


def test_the_same_gpu_identity_decodes(model_and_images, monkeypatch):
    model, x = model_and_images
    pretend(monkeypatch, H200)
    data = compress_images(model, x)[0]
    assert torch.equal(decompress_images(model, data)[0], x)


def test_other_cpu_kernels_are_refused_with_the_capability_to_select(model_and_images, monkeypatch):
    model, x = model_and_images
    data = compress_images(model, x)[0]
    here = container.device_identity(torch.device("cpu"))
    pretend(monkeypatch, dict(here, cpu="AVX512" if here["cpu"] != "AVX512" else "AVX2"))
    no_decoding(monkeypatch)
    with pytest.raises(CompressedFileError, match=f"ATEN_CPU_CAPABILITY={here['cpu'].lower()}"):
        decompress_images(model, data)


def test_a_gpu_record_without_the_gpus_identity_is_refused(model_and_images, monkeypatch):
    """A CUDA record that names no GPU model cannot show that this GPU computes the same probabilities: refused on
    any GPU, as on the CPU."""
    model, x = model_and_images
    data = compress_images(model, x)[0]
    unnamed = with_environment(data, f"torch {torch.__version__} cuda constriction 0.4.1")
    assert "gpu" not in container.parse_environment(unpack(unnamed).environment)
    pretend(monkeypatch, H200)
    with pytest.raises(CompressedFileError, match="other GPU"):
        decompress_images(model, unnamed)
    monkeypatch.undo()
    no_decoding(monkeypatch)
    with pytest.raises(CompressedFileError, match="compressed on CUDA"):
        decompress_images(model, unnamed)


def test_a_long_gpu_name_keeps_the_record_readable(monkeypatch):
    pretend(monkeypatch, dict(H200, gpu="X" * 400))
    text = container.environment(torch.device("cuda"))
    record = container.parse_environment(text)
    assert len(text) <= 255 and record["device"] == "cuda" and record["gpu"].startswith("XXX")
