"""Background models for the likelihood ratio: ``--perturb`` (uniform noise in a fraction of the training
sub-pixels, exact resume, clean held-out evaluation, kept in the checkpoint and shown by ``info``) and the named
``fashion-mnist`` dataset."""
import numpy as np
import pytest
import torch

from cli_support import check_ok, run_cli, train_pixel_run
from conftest import ImageSet, tiny_train_config
from vqprior.checkpoint import read_checkpoint
from vqprior.config import ConfigError, DataConfig
from vqprior.training.pixel_task import PixelTask, perturb_images


def test_perturb_replaces_the_asked_fraction_of_sub_pixels_by_uniform_values():
    images = torch.full((64, 3, 16, 16), 7, dtype=torch.uint8)
    assert perturb_images(images, 0.0) is images
    torch.manual_seed(0)
    out = perturb_images(images, 0.25)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = out != 7  # a replacement that draws 7 again is unchanged: 1/256 of them
    assert abs(changed.float().mean().item() - 0.25 * 255 / 256) < 0.01
    counts = torch.bincount(out[changed].long(), minlength=256)[torch.arange(256) != 7]
    assert counts.min() > 0.5 * counts.float().mean()  # every other value is drawn, none favoured
    torch.manual_seed(0)
    assert torch.equal(perturb_images(images, 0.25), out)  # the global RNG alone decides


def test_the_background_loss_sees_noise_and_evaluation_clean_images():
    from vqprior.config import model_config_from_preset

    config = model_config_from_preset("tiny", height=8, width=8, dropout=0.0)
    clean, noisy = PixelTask(config, DataConfig()), PixelTask(config, DataConfig(perturb=0.5))
    model = clean.build_model()
    batch = {"image": ImageSet(4).images[:4] // 4, "label": torch.zeros(4, dtype=torch.long)}  # values 0..63
    torch.manual_seed(1)
    loss_noisy = noisy.loss(model, batch)[0]
    torch.manual_seed(1)
    perturbed = {"image": perturb_images(batch["image"], 0.5), "label": batch["label"]}
    assert torch.equal(loss_noisy, clean.loss(model, perturbed)[0])  # the noisy task scores a perturbed batch ...
    assert not torch.equal(loss_noisy, clean.loss(model, batch)[0])
    loader = torch.utils.data.DataLoader(ImageSet(8, seed=1), batch_size=4)
    assert noisy.evaluate(model, loader) == clean.evaluate(model, loader)  # ... and evaluates on clean images


def test_a_perturbed_run_resumes_exactly(tmp_path):
    from vqprior.config import model_config_from_preset
    from vqprior.training.loop import train

    task = PixelTask(model_config_from_preset("tiny", height=8, width=8, dropout=0.0), DataConfig(perturb=0.2))

    def run(out, steps, checkpoint=None):
        train(task, ImageSet(), ImageSet(8, seed=1), tiny_train_config(steps), out, checkpoint=checkpoint,
              progress=False)
        return read_checkpoint(out / "latest.pt")

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    part = run(tmp_path / "part", 6, checkpoint=read_checkpoint(tmp_path / "part" / "latest.pt"))
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])


def test_perturb_is_kept_in_the_checkpoint_shown_by_info_and_kept_on_resume(tmp_path):
    train_pixel_run(tmp_path / "bg", "--perturb", "0.15", steps=2)
    data = read_checkpoint(tmp_path / "bg" / "latest.pt")
    assert data["config"]["data"]["perturb"] == 0.15
    shown = check_ok(run_cli("info", tmp_path / "bg" / "latest.pt")).output
    assert "perturb=0.15" in shown and "background model" in shown
    refused = run_cli("train-pixels", "--out", tmp_path / "bg", "--resume", "--steps", "3", "--perturb", "0.3")
    assert refused.exit_code != 0 and "--perturb 0.3 (was 0.15)" in refused.output


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_perturb_outside_0_1_is_refused(tmp_path, value):
    result = run_cli("train-pixels", "--dataset", "sample", "--perturb", value, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--perturb" in result.output and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="perturb"):
        DataConfig(perturb=float(value))


@pytest.mark.parametrize("command", ["train-prior", "train-vqvae"])
def test_the_other_train_commands_have_no_perturb(tmp_path, command):
    result = run_cli(command, "--perturb", "0.1", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "No such option" in result.output and "--perturb" in result.output


def test_fashion_mnist_reads_the_mnist_layout_and_torchvision_files(tmp_path):
    from vqprior.data.loader import load_image_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", images=images, labels=np.arange(5))
    data = load_image_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert (len(data), data.channels, data.height, data.width) == (5, 1, 28, 28)
    assert torch.equal(data[3]["image"][0], torch.from_numpy(images[3])) and int(data[3]["label"]) == 3
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):  # torchvision looks for both splits' files
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x0803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), 0x0801)
    pytest.importorskip("torchvision")
    from_tv = load_image_dataset("fashion-mnist", "test", data_dir=tmp_path / "tv")
    assert len(from_tv) == 5 and torch.equal(from_tv[4]["image"][0], torch.from_numpy(images[4]))


def _write_idx(path, array, magic):
    """An MNIST idx file (big-endian magic and sizes, then the bytes), the format torchvision reads."""
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_without_data_says_where_to_put_it(tmp_path):
    result = run_cli("evaluate", "--help")
    assert "fashion-mnist" in result.output
    from vqprior.data.loader import load_image_dataset
    from vqprior.errors import UserError
    with pytest.raises(UserError, match="FashionMNIST/raw"):
        load_image_dataset("fashion-mnist", "test", data_dir=tmp_path)
