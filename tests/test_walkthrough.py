"""The README's "Your own images at 256×256" commands run as written, at reduced size: a small synthetic folder of
JPEGs in two classes at 16x16 instead of 256x256, tiny widths instead of the vqvae2-* presets, two training steps.

Only the substitutions in ``REDUCED`` are made (each must still occur in the README, so an edit there cannot
silently leave this test running something else), plus the fast flags appended to the training commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from cli_support import check_ok, run_cli

REPO = Path(__file__).resolve().parents[1]
REDUCED = {  # README text -> the reduced-size stand-in
    "--image-size 256": "--image-size 16",
    "--preset vqvae2-256": "--preset tiny --levels 2",  # 16x16 -> 8x8 bottom and 4x4 top codes of 16
    "--preset vqvae2-top": "--preset tiny",
    "--preset vqvae2-bottom": "--preset tiny",
    "--batch-size 16": "--batch-size 4",
    "--keep-rows 128": "--keep-rows 8",
}
FAST = ["--steps", "2", "--eval-every", "2", "--sample-every", "2", "--num-samples", "2", "--eval-limit", "4",
        "--quiet", "--device", "cpu"]


def walkthrough_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own images at 256×256"):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    for original in REDUCED:
        assert original in block, f"the README walkthrough no longer says {original!r}: update REDUCED"
    for original, reduced in REDUCED.items():
        block = block.replace(original, reduced)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def write_photos(root: Path) -> None:
    """Two classes of 14 JPEGs of mixed sizes (resized and centre-cropped to 16x16), one photo to complete."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cats", "dogs")):
        (root / "photos" / name).mkdir(parents=True)
        for i in range(14):
            h, w = 20 + i % 5, 24 + i % 3
            base = np.linspace(40 + 120 * k, 200 - 120 * k, w)[None, :, None] + rng.normal(0, 20, (h, w, 3))
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(root / "photos" / name / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "photo.jpg")  # resized


def test_readme_walkthrough_runs_at_reduced_size(tmp_path, monkeypatch):
    write_photos(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = walkthrough_commands()
    assert [c[1] for c in commands] == ["train-vqvae", "info", "extract-codes", "extract-codes", "info",
                                        "train-prior", "train-prior", "sample", "complete", "compress", "decompress"]
    outputs = {}
    for command in commands:
        assert command[0] == "vqprior"
        args = command[1:] + (FAST if command[1].startswith("train-") else [])
        outputs[" ".join(command[1:3])] = check_ok(run_cli(*args)).output
    cache = next(Path("cache").glob("*.lmdb"))
    assert cache.name.endswith("-jpeg90.lmdb")
    assert "stored as jpeg (quality 90), complete" in outputs["info cache"]
    assert "levels: top 4x4 (16 codes), bottom 8x8 (16 codes)" in outputs["info codes/train.lmdb"]
    assert "classes: 2" in outputs["info codes/train.lmdb"]
    for path in ("runs/vq/latest.pt", "runs/top/latest.pt", "runs/bottom/latest.pt", "samples.png",
                 "completions.png", "test.vqc", "test_codes.npz"):
        assert Path(path).is_file(), path
    with Image.open("samples.png") as im:
        assert im.size[0] >= 16 * 2
    with np.load("test_codes.npz") as z:  # the decompressed codes are the test split's, exactly
        from vqprior.data.codes import CodeDataset
        test = CodeDataset("codes/test.lmdb")
        assert np.array_equal(z["top"], np.stack([test[i]["top"].numpy() for i in range(len(test))]))
        assert np.array_equal(z["bottom"], np.stack([test[i]["bottom"].numpy() for i in range(len(test))]))
