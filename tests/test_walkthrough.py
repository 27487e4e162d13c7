"""docs/train-256.md, the 256x256 guide, runs as written at reduced size, for a labelled and an unlabelled folder: a
small synthetic folder of JPEGs at 16x16 instead of 256x256, tiny widths instead of the vqvae2-* presets, two
training steps.

Only the substitutions of ``GUIDE_REDUCED`` are made, plus the fast flags appended to the training commands; each
substitution must still occur in the guide, so an edit there cannot silently leave this test running something
else. The guide's two top-prior blocks are the labelled and the unlabelled variant: each flow runs its own."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_support import check_ok, run_cli, whole_option
from conftest import REPO

GUIDE = REPO / "docs" / "train-256.md"
GUIDE_REDUCED = {
    "--image-size 256": "--image-size 16",
    "--preset vqvae2-256": "--preset tiny --levels 2",  # 16x16 -> 8x8 bottom and 4x4 top codes of 16
    "--preset vqvae2-top": "--preset tiny",
    "--preset vqvae2-bottom": "--preset tiny",
    "--batch-size 32": "--batch-size 4",
    "--batch-size 16": "--batch-size 4",
    "--batch-size 8": "--batch-size 4",
    "--grad-accum 4": "--grad-accum 2",
    "--grad-accum 8": "--grad-accum 2",
    "--steps 50000": "--steps 2",
    "--steps 100000": "--steps 2",
    "--cooldown-steps 10000": "--cooldown-steps 1",
    "--workers 4": "--workers 1",
    "--keep-rows 128": "--keep-rows 8",
    "--num 4": "--num 2",
}
FAST = ["--eval-every", "2", "--sample-every", "2", "--num-samples", "2", "--eval-limit", "4", "--quiet",
        "--device", "cpu"]


def guide_blocks() -> list[list[list[str]]]:
    """The guide's bash blocks, reduced, each as its list of commands."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.DOTALL):
        for original, stand_in in GUIDE_REDUCED.items():
            block = whole_option(original).sub(stand_in, block)
        lines = block.replace("\\\n", " ").splitlines()
        blocks.append([shlex.split(line, comments=True) for line in lines if line.strip()])
    return blocks


def test_every_reduction_is_of_text_the_guide_still_has():
    guide = GUIDE.read_text()
    stale = [original for original in GUIDE_REDUCED if not whole_option(original).search(guide)]
    assert not stale, f"docs/train-256.md no longer says {stale}: update GUIDE_REDUCED"


def write_photos(root: Path, labelled: bool) -> None:
    """28 JPEGs of mixed sizes (resized and centre-cropped to 16x16), in two class folders or all in one folder,
    and one photo to complete."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cats", "dogs")):
        folder = root / "photos" / (name if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(14):
            h, w = 20 + i % 5, 24 + i % 3
            base = np.linspace(40 + 120 * k, 200 - 120 * k, w)[None, :, None] + rng.normal(0, 20, (h, w, 3))
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f"{name}{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "photo.jpg")


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_the_guide_runs_at_reduced_size(tmp_path, monkeypatch, labelled):
    write_photos(tmp_path, labelled)
    monkeypatch.chdir(tmp_path)
    blocks = guide_blocks()
    tops = [i for i, block in enumerate(blocks) if any("--level" in c and "top" in c for c in block)]
    assert len(tops) == 2 and "--class-conditional" in blocks[tops[0]][0] and \
        "--class-conditional" not in blocks[tops[1]][0], "the guide's labelled and unlabelled top-prior blocks"
    skip = tops[1] if labelled else tops[0]
    commands = [c for i, block in enumerate(blocks) if i != skip for c in block]
    assert [c[1] for c in commands] == ["train-vqvae", "info", "extract-codes", "extract-codes", "info",
                                        "train-prior", "train-prior", "sample", "complete", "compress", "decompress"]
    outputs = {}
    for command in commands:
        assert command[0] == "vqprior"
        args = command[1:] + (FAST if command[1].startswith("train-") else [])
        outputs[" ".join(command[1:3])] = check_ok(run_cli(*args)).output
    assert next(Path("cache").glob("*.lmdb")).name.endswith("-jpeg90.lmdb")
    assert "stored as jpeg (quality 90), complete" in outputs["info cache"]
    assert "levels: top 4x4 (16 codes), bottom 8x8 (16 codes)" in outputs["info codes/train.lmdb"]
    assert ("classes: 2" in outputs["info codes/train.lmdb"]) == labelled
    for path in ("runs/vq/latest.pt", "runs/top/latest.pt", "runs/bottom/latest.pt", "samples.png",
                 "completions.png", "test.vqc", "test_codes.npz"):
        assert Path(path).is_file(), path
    with np.load("test_codes.npz") as z:  # the decompressed codes are the test split's, exactly
        from vqprior.data.codes import CodeDataset
        test = CodeDataset("codes/test.lmdb")
        assert np.array_equal(z["top"], np.stack([test[i]["top"].numpy() for i in range(len(test))]))
        assert np.array_equal(z["bottom"], np.stack([test[i]["bottom"].numpy() for i in range(len(test))]))
