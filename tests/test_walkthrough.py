"""The README's "Your own images at 256x256" commands run as written, at reduced size: a small synthetic folder of
JPEGs in two classes at 16x16 instead of 256x256, tiny widths instead of the vqvae2-* presets, two training steps.

Only the substitutions of ``README_REDUCED`` (tests/cli_support.py, shared with the README tour's test) are made,
plus the fast flags appended to the training commands; each substitution must still occur in the README, so an edit
there cannot silently leave these tests running something else."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from cli_support import README_REDUCED, check_ok, reduced, run_cli, whole_option

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--eval-every", "2", "--sample-every", "2", "--num-samples", "2", "--eval-limit", "4",
        "--quiet", "--device", "cpu"]


def walkthrough_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own images at 256×256"):]
    block = reduced(re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1))
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def test_every_reduction_is_of_text_the_readme_still_has():
    readme = (REPO / "README.md").read_text()
    stale = [original for original in README_REDUCED if not whole_option(original).search(readme)]
    assert not stale, f"the README no longer says {stale}: update README_REDUCED in tests/cli_support.py"


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
