"""scripts/demo.py (``make demo``): it finds the shipped models by name, writes samples and completions of the
held-out demo images for each, the short training run with its grid and curves, and an index that names every
picture it wrote; a broken model fails the demo (non-zero) without losing the rest.

The "shipped" models here are tiny ones trained in the test, in a checkpoints folder of the test's own.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_support import TINY_TRAIN, check_ok, run_cli
from conftest import REPO, load_script

pytest.importorskip("matplotlib")
TINY_DEMO_TRAIN = "--preset tiny --image-size 8 --limit 32 --eval-limit 8 --num-samples 4 --quiet --device cpu"


def load_demo():
    return load_script("demo")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, pixel_run, prior_pipeline) -> Path:
    """checkpoints/ with a CIFAR-10 pixel model, a CIFAR-10 top/bottom prior pair (the session's tiny ones) and a
    class-conditional MNIST pixel model (1 channel, 28x28, trained on a fake MNIST folder)."""
    root = tmp_path_factory.mktemp("shipped")
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    shutil.copy(pixel_run.checkpoint, ckpts / "cifar10-pixels-small.pt")
    shutil.copy(prior_pipeline.top, ckpts / "cifar10-prior-top.pt")
    shutil.copy(prior_pipeline.bottom, ckpts / "cifar10-prior-bottom.pt")
    (root / "mnist").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(root / "mnist" / f"{split}.npz", images=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
                 labels=np.arange(10, dtype=np.int64))
    check_ok(run_cli("train-pixels", "--dataset", "mnist", "--data-dir", root / "mnist", "--class-conditional",
                     "--steps", "1", *TINY_TRAIN, "--out", root / "mnist-px"))
    shutil.copy(root / "mnist-px" / "latest.pt", ckpts / "mnist-pixels.pt")
    (ckpts / "README.md").write_text("not a model\n")
    return ckpts


def listed_pictures(index: Path) -> list[str]:
    return [line.strip() for line in index.read_text().splitlines() if line.strip().endswith(".png")
            and line.startswith("  ") and not line.startswith("      ")]


def test_demo_shows_every_shipped_model_and_indexes_every_picture(shipped, tmp_path, capsys):
    demo = load_demo()
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--checkpoints", str(shipped), "--steps", "2",
                      "--train-extra", TINY_DEMO_TRAIN]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    listed = listed_pictures(out / "README.txt")
    assert sorted(listed) == written  # every picture is named in the index, and nothing else
    for model in ("cifar10-pixels-small", "cifar10-prior", "mnist-pixels"):
        assert f"shipped/{model}_samples.png" in listed
        for image, _ in demo.TEST_IMAGES[model.split("-")[0]]:
            assert f"shipped/{model}_complete_{Path(image).stem}.png" in listed
    assert "samples_step2.png" in listed and "curves.png" in listed
    assert not any("mnist-prior" in p for p in listed)  # not shipped here: not shown, not an error

    text = (out / "README.txt").read_text()
    # The class-conditional MNIST model completes each digit given its class; the unconditional one gets none.
    mnist_cmds = [line for line in text.splitlines() if "made by: vqprior complete" in line and "mnist-pixels" in line]
    assert [re.search(r"--class (\d)", c).group(1) for c in mnist_cmds] == ["7", "2"]
    cifar_px = [line for line in text.splitlines() if "made by: vqprior complete" in line and "cifar10-pixels" in line]
    assert cifar_px and not any("--class" in c for c in cifar_px)
    assert "column k is class k (0 0, 1 1" in text and "held-out" in text

    # Completions: the original, the masked input and the completions side by side, in one row.
    grid = Image.open(out / "shipped" / "mnist-pixels_complete_mnist-test-0000.png")
    assert grid.size[0] > (demo.NUM_COMPLETIONS + 2) * 28 * 2 > grid.size[1] * 5
    page = (out / "index.html").read_text()
    assert all(f"<img src='{p}'>" in page for p in listed)
    printed = capsys.readouterr().out
    assert "$ vqprior sample" in printed and "$ vqprior complete" in printed and "$ vqprior plot" in printed


def test_a_broken_shipped_model_fails_the_demo_but_keeps_the_rest(shipped, tmp_path):
    demo = load_demo()
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(shipped / "cifar10-pixels-small.pt", ckpts / "cifar10-pixels-small.pt")
    (ckpts / "mnist-pixels.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--checkpoints", str(ckpts), "--steps", "1",
                      "--train-extra", TINY_DEMO_TRAIN]) == 1
    listed = listed_pictures(out / "README.txt")
    assert "shipped/cifar10-pixels-small_samples.png" in listed and "samples_step1.png" in listed
    assert not any("mnist" in p for p in listed)


def test_demo_images_are_the_held_out_images_they_are_named_after():
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None or not all((data / d / "test.npz").is_file() for d in ("cifar10", "mnist")):
        pytest.skip("the real CIFAR-10 / MNIST test splits are not here")
    demo = load_demo()
    for dataset, images in demo.TEST_IMAGES.items():
        with np.load(data / dataset / "test.npz") as z:
            pixels, labels = z["images"], z["labels"]
        for name, label in images:
            index = int(re.fullmatch(rf"{dataset}-test-(\d+)\.png", name).group(1))
            shipped = np.array(Image.open(REPO / "scripts" / "demo_images" / name))
            np.testing.assert_array_equal(shipped, pixels[index])
            assert labels[index] == label, name


def test_the_demo_shows_one_guided_grid_when_a_shipped_model_has_a_null_class(shipped, prior_pipeline, tmp_path):
    demo = load_demo()
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("cifar10-pixels-small.pt", "cifar10-prior-bottom.pt", "mnist-pixels.pt"):
        shutil.copy(shipped / name, ckpts / name)
    (tmp_path / "out" / "shipped").mkdir(parents=True)
    run = demo.Demo(tmp_path / "out")
    demo.show_guided(run, ckpts)
    assert run.entries == [] and run.failed == []  # no model with a null class: nothing shown, no failure
    check_ok(run_cli("train-prior", "--codes", prior_pipeline.train_codes, "--init-from",
                     shipped / "cifar10-prior-top.pt", "--class-dropout", "0.5", "--steps", "1", "--batch-size", "4",
                     "--num-samples", "1", "--quiet", "--device", "cpu", "--out", tmp_path / "top"))
    shutil.copy(tmp_path / "top" / "latest.pt", ckpts / "cifar10-prior-top.pt")
    demo.show_guided(run, ckpts)
    assert len(run.entries) == 1 and run.failed == []
    section, path, what, command = run.entries[0]
    assert path.name == "cifar10-prior_guided.png" and path.is_file()
    assert "--guidance 1" in command and "--class-rows" in command and "W = 1" in what

