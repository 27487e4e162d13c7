"""The trained checkpoints in checkpoints/ load, sample, and score what checkpoints/README.md says they score.

The pixel model's figure on the first 100 images of the bundled sample's test part (real CIFAR-10 test images) is
re-measured here, so the shipped file and its documented result cannot drift apart. (Its full test-split figure is reproduced by the
README's ``vqprior evaluate`` command; 10,000 images take minutes, too long for the suite.)
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cli_support import absolute_paths_in, check_ok, run_cli

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
PIXELS = CHECKPOINTS / "cifar10-pixels-small.pt"


def documented_sample_bpd(name: str) -> float:
    """The 'sample test[:100] X bits/dim' figure of ``name``'s row in checkpoints/README.md."""
    for line in (CHECKPOINTS / "README.md").read_text().splitlines():
        if line.startswith(f"| `{name}`"):
            return float(re.search(r"sample test\[:100\] ([0-9.]+) bits/dim", line).group(1))
    raise AssertionError(f"{name} has no row in checkpoints/README.md")


def test_shipped_pixel_model_scores_its_documented_figure():
    out = check_ok(run_cli("evaluate", PIXELS, "--dataset", "sample", "--split", "test", "--limit", "100",
                           "--quiet", "--device", "cpu")).output
    measured = float(re.search(r"([0-9.]+) bits/dim", out).group(1))
    assert "100 items" in out
    assert abs(measured - documented_sample_bpd(PIXELS.name)) < 0.01, out


def test_shipped_pixel_model_samples(tmp_path):
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", PIXELS, "--num", "2", "--out", tmp_path / "s.png", "--save-array", array,
                     "--device", "cpu"))
    images = np.load(array)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert images.std() > 10  # not a constant image


def test_shipped_priors_sample_decoded_images(tmp_path):
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", CHECKPOINTS / "cifar10-prior-top.pt", "--bottom", CHECKPOINTS / "cifar10-prior-bottom.pt",
                     "--num", "2", "--class", "3", "--out", tmp_path / "s.png", "--save-array", array,
                     "--device", "cpu"))
    images = np.load(array)
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    assert images.std() > 10


def test_shipped_checkpoints_carry_no_machine_paths():
    import torch

    shipped = sorted(CHECKPOINTS.glob("*.pt"))
    assert len(shipped) == 4
    for path in shipped:
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert not absolute_paths_in(data), (path.name, absolute_paths_in(data))
        assert b"/work/" not in path.read_bytes() and b"/home/" not in path.read_bytes(), path.name
