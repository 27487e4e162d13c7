"""The trained checkpoints in checkpoints/ load, sample, and score what checkpoints/README.md says they score.

The figures on the first 100 images of the bundled sample's test part (real CIFAR-10 test images: the pixel model's
bits/dim, the VQ-VAE's PSNR, the priors' bits/code) and both MNIST pixel models' on the first 200 MNIST test images
are re-measured here, so the shipped files and their documented results cannot drift apart; the class-conditional
MNIST models must draw the digit asked for. (Full test-split figures, in the README's results table, are reproduced by
the ``vqprior evaluate`` commands of docs/results.md; 10,000 images take minutes, too long for the suite.)
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cli_support import absolute_paths_in, check_ok, run_cli

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
PIXELS = CHECKPOINTS / "cifar10-pixels-small.pt"
MNIST_PIXELS = CHECKPOINTS / "mnist-pixels.pt"
MNIST_CONDITIONAL = CHECKPOINTS / "mnist-pixels-conditional.pt"


def mnist_dir():
    """../shared/data/mnist with train.npz and test.npz, or skip."""
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None or not all((data / "mnist" / f"{split}.npz").exists() for split in ("train", "test")):
        pytest.skip("the real MNIST splits (../shared/data/mnist) are not here")
    return data / "mnist"


def documented(name: str, pattern: str) -> float:
    """A number of ``name``'s row in checkpoints/README.md, captured by ``pattern``'s group."""
    for line in (CHECKPOINTS / "README.md").read_text().splitlines():
        if line.startswith(f"| `{name}`"):
            return float(re.search(pattern, line).group(1))
    raise AssertionError(f"{name} has no row in checkpoints/README.md")


def documented_bpd(name: str, subset: str = "sample test[:100]") -> float:
    """The '<subset> X bits/dim' figure of ``name``'s row in checkpoints/README.md."""
    return documented(name, re.escape(subset) + r" ([0-9.]+) bits/dim")


def test_shipped_pixel_model_scores_its_documented_figure():
    out = check_ok(run_cli("evaluate", PIXELS, "--dataset", "sample", "--split", "test", "--limit", "100",
                           "--quiet", "--device", "cpu")).output
    measured = float(re.search(r"([0-9.]+) bits/dim", out).group(1))
    assert "100 items" in out
    assert abs(measured - documented_bpd(PIXELS.name)) < 0.01, out


@pytest.mark.parametrize("model", [MNIST_PIXELS, MNIST_CONDITIONAL], ids=lambda p: p.stem)
def test_shipped_mnist_model_scores_its_documented_figure(model):
    out = check_ok(run_cli("evaluate", model, "--dataset", "mnist", "--data-dir", mnist_dir(), "--split",
                           "test", "--limit", "200", "--quiet", "--device", "cpu")).output
    measured = float(re.search(r"([0-9.]+) bits/dim", out).group(1))
    assert abs(measured - documented_bpd(model.name, "MNIST test[:200]")) < 0.01, out


def nearest_mnist_labels(samples: np.ndarray) -> np.ndarray:
    """The label of each sample's nearest MNIST training image (raw pixels, Euclidean)."""
    import torch

    train = np.load(mnist_dir() / "train.npz")
    references = torch.from_numpy(train["images"].reshape(len(train["images"]), -1)).float()
    nearest = torch.cdist(torch.from_numpy(samples.reshape(len(samples), -1)).float(), references).argmin(1)
    return train["labels"].astype(np.int64)[nearest.numpy()]


@pytest.mark.parametrize("model", [MNIST_CONDITIONAL, CHECKPOINTS / "mnist-prior.pt"], ids=lambda p: p.stem)
def test_shipped_class_conditional_mnist_models_draw_the_requested_digit(model, tmp_path):
    """Two samples per class, each labelled by its nearest MNIST training image: at least half must be labelled with
    the class they were drawn for (chance: 1 in 10). bench/sample_classes.py measures 100."""
    mnist_dir()
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", model, "--num", "20", "--seed", "0", "--save-array", array, "--device", "cpu",
                     "--quiet"))
    labelled = nearest_mnist_labels(np.load(array))  # sample i is drawn for class i % 10
    assert int((labelled == np.arange(20) % 10).sum()) >= 10, labelled.tolist()


def test_shipped_mnist_model_samples_digits(tmp_path):
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", MNIST_PIXELS, "--num", "2", "--save-array", array, "--device", "cpu"))
    images = np.load(array)
    assert images.shape == (2, 1, 28, 28) and images.dtype == np.uint8
    # MNIST digits: a mostly black background with some bright strokes
    assert (images < 32).mean() > 0.5 and (images > 128).any()


def test_shipped_pixel_model_samples(tmp_path):
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", PIXELS, "--num", "2", "--out", tmp_path / "s.png", "--save-array", array,
                     "--device", "cpu"))
    images = np.load(array)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert images.std() > 10  # not a constant image


def test_shipped_priors_sample_decoded_images(tmp_path):
    array = tmp_path / "s.npy"
    top, bottom = CHECKPOINTS / "cifar10-prior-top.pt", CHECKPOINTS / "cifar10-prior-bottom.pt"
    check_ok(run_cli("sample", top, "--bottom", bottom, "--num", "2", "--class", "3", "--out", tmp_path / "s.png",
                     "--save-array", array, "--device", "cpu"))
    images = np.load(array)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert images.std() > 10


def test_shipped_vqvae_and_priors_score_their_documented_figures(tmp_path):
    """PSNR of the VQ-VAE and bits/code of both priors on the first 100 test images of the bundled sample."""
    vqvae = CHECKPOINTS / "cifar10-vqvae.pt"
    out = check_ok(run_cli("evaluate", vqvae, "--dataset", "sample", "--split", "test", "--limit", "100",
                           "--quiet", "--device", "cpu")).output
    psnr = float(re.search(r"PSNR ([0-9.]+) dB", out).group(1))
    assert abs(psnr - documented(vqvae.name, r"sample test\[:100\] ([0-9.]+) dB")) < 0.02, out
    codes = tmp_path / "codes.lmdb"
    check_ok(run_cli("extract-codes", "--vqvae", vqvae, "--dataset", "sample", "--split", "test", "--limit", "100",
                     "--out", codes, "--quiet", "--device", "cpu"))
    for level in ("top", "bottom"):
        prior = CHECKPOINTS / f"cifar10-prior-{level}.pt"
        out = check_ok(run_cli("evaluate", prior, "--codes", codes, "--quiet", "--device", "cpu")).output
        bits = float(re.search(r"([0-9.]+) bits/code", out).group(1))
        assert abs(bits - documented(prior.name, r"sample test\[:100\] ([0-9.]+) bits/code")) < 0.01, out


def test_shipped_checkpoints_carry_no_machine_paths():
    import torch

    shipped = sorted(CHECKPOINTS.glob("*.pt"))
    listed = re.findall(r"^\| `([^`]+\.pt)` \|", (CHECKPOINTS / "README.md").read_text(), re.MULTILINE)
    assert [p.name for p in shipped] == sorted(listed)  # every shipped file is documented, and only those
    for path in shipped:
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert not absolute_paths_in(data), (path.name, absolute_paths_in(data))
        assert b"/work/" not in path.read_bytes() and b"/home/" not in path.read_bytes(), path.name


def test_class_rows_lay_out_one_row_per_class(tmp_path):
    from PIL import Image

    from vqprior.images import make_grid

    grid, array = tmp_path / "g.png", tmp_path / "s.npy"
    args = ["sample", CHECKPOINTS / "cifar10-prior-top.pt", "--bottom", CHECKPOINTS / "cifar10-prior-bottom.pt",
            "--num", "20", "--out", grid, "--save-array", array, "--device", "cpu", "--quiet"]
    check_ok(run_cli(*args, "--class-rows"))
    images = np.load(array)  # sample i has class i % 10; the grid shows class k in row k
    order = np.argsort(np.arange(20) % 10, kind="stable")
    import torch

    expected = make_grid(torch.from_numpy(images[order]), 2).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(grid).convert("RGB")), expected)
    for bad in (["--num", "15"], ["--nrow", "4"], ["--class", "3"]):
        result = run_cli(*args[:6], *bad, *args[6:], "--class-rows") if bad[0] != "--num" else \
            run_cli(*[a if a != "20" else "15" for a in args], "--class-rows")
        assert result.exit_code == 2 and "--class-rows" in result.output, (bad, result.output)


def test_shipped_mnist_prior_samples_the_requested_class(tmp_path):
    """``--class 7`` draws sevens: most samples are labelled 7 by their nearest MNIST training image (chance: 1 in
    10), where the default class order (i % 10) would give one."""
    mnist_dir()
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", CHECKPOINTS / "mnist-prior.pt", "--num", "6", "--class", "7", "--seed", "0",
                     "--save-array", array, "--device", "cpu", "--quiet"))
    images = np.load(array)
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    labelled = nearest_mnist_labels(images)
    assert int((labelled == 7).sum()) >= 4, labelled.tolist()
