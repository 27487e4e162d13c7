"""The shipped Fashion-MNIST pixel model and its background model (checkpoints/, docs/ood.md) score the figures
checkpoints/README.md gives on the first 200 Fashion-MNIST test images, and the background model says what it is.
Skipped without the real Fashion-MNIST splits (../shared/data/fashion_mnist)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli_support import check_ok, run_cli

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
MODELS = [CHECKPOINTS / "fashion-mnist-pixels.pt", CHECKPOINTS / "fashion-mnist-background.pt"]


def fashion_dir() -> Path:
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None or not (data / "fashion_mnist" / "test.npz").exists():
        pytest.skip("the real Fashion-MNIST splits (../shared/data/fashion_mnist) are not here")
    return data / "fashion_mnist"


def documented_bpd(name: str) -> float:
    for line in (CHECKPOINTS / "README.md").read_text().splitlines():
        if line.startswith(f"| `{name}`"):
            return float(re.search(r"Fashion-MNIST test\[:200\] ([0-9.]+) bits/dim", line).group(1))
    raise AssertionError(f"{name} has no row in checkpoints/README.md")


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_shipped_fashion_mnist_models_score_their_documented_figures(model):
    out = check_ok(run_cli("evaluate", model, "--dataset", "fashion-mnist", "--data-dir", fashion_dir(), "--split",
                           "test", "--limit", "200", "--quiet", "--device", "cpu")).output
    measured = float(re.search(r"([0-9.]+) bits/dim", out).group(1))
    assert "200 items" in out and abs(measured - documented_bpd(model.name)) < 0.01, out


def test_the_shipped_background_model_is_one():
    shown = check_ok(run_cli("info", MODELS[1])).output
    assert "background model: trained with" in shown and "perturb=0.2" in shown
    assert "perturb=0.0" in check_ok(run_cli("info", MODELS[0])).output
