"""Helpers for the CLI tests (test_cli.py, the bad-input tables): invoking ``vqprior`` in-process with click's
CliRunner, and building the tiny trained artefacts (a pixel run; a 2-level VQ-VAE with code caches and top/bottom
priors) that the tests share. Not a test module itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from click.testing import CliRunner, Result

from vqprior.commands.cli import cli

# Tiny everything, CPU, no progress bars: each training command takes a second or two.
TINY_TRAIN = ["--preset", "tiny", "--batch-size", "8", "--eval-limit", "16", "--num-samples", "4", "--quiet",
              "--device", "cpu"]
# One step of a tiny model on 8x8 images: for commands that must fail (or just run) as fast as possible.
TRAIN_FAST = ["--preset", "tiny", "--image-size", "8", "--steps", "1", "--batch-size", "4", "--num-samples", "2",
              "--eval-limit", "4", "--quiet", "--device", "cpu"]


# The README's five-minute tour, run by test_doc_commands.py at reduced size: README text -> its stand-in. Only whole
# options are replaced (``--steps 100``, not the start of ``--steps 1000``), and each entry must still occur in the
# README (test_doc_commands.py checks), so an edit there cannot leave the test running something else.
README_REDUCED = {
    "--steps 100": "--steps 2",
    "--steps 150": "--steps 3",  # the tour's resume: one step further
    "--steps 200": "--steps 2",
    "--num 16": "--num 2",
    "--num 4": "--num 2",
    "--limit 100": "--limit 8",
    "--keep-rows 16": "--keep-rows 28",  # 32x32 images: the last 4 rows are sampled
}


def whole_option(text: str) -> re.Pattern:
    """``text`` as whole words of a command line."""
    return re.compile(rf"(?<!\S){re.escape(text)}(?!\S)")


def reduced(text: str) -> str:
    """``text`` with every README_REDUCED substitution made."""
    for original, stand_in in README_REDUCED.items():
        text = whole_option(original).sub(stand_in, text)
    return text


def run_cli(*args) -> Result:
    """``vqprior ARGS`` in-process; exceptions are caught into ``result.exception`` (SystemExit for clean exits)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def check_ok(result: Result) -> Result:
    """Assert a clean exit 0, showing the output (and any traceback) when not."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        detail = "".join(traceback.format_exception(result.exception))
    else:
        detail = result.output
    assert result.exit_code == 0, detail
    return result


def train_pixel_run(out: Path, *extra, steps: int = 4, image_size: int = 8, limit: int = 64) -> Result:
    """``train-pixels`` on the bundled sample data, tiny preset."""
    return check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", image_size, "--limit", limit,
                            "--steps", steps, *TINY_TRAIN, "--out", out, *extra))


def absolute_paths_in(obj) -> list[str]:
    """Every string inside nested dicts / lists / tuples (keys too) that is an absolute or home-relative path."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in absolute_paths_in(k) + absolute_paths_in(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in absolute_paths_in(v)]
    return [obj] if isinstance(obj, str) and (obj.startswith(("/", "~")) or "\\" in obj) else []


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` with size and mtime (LMDB lock files only by name: readers may touch them)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (p.is_dir(),) if p.is_dir() or p.name == "lock.mdb" else \
            (st.st_size, st.st_mtime_ns)
    return out


@dataclass
class PixelRun:
    """A ``train_pixel_run`` folder: its checkpoint, the command's result, and what it was asked for."""
    folder: Path
    result: Result
    steps: int
    limit: int

    @property
    def checkpoint(self) -> Path:
        return self.folder / "latest.pt"


def build_pixel_run(out: Path, *extra, steps: int = 2, limit: int = 16) -> PixelRun:
    """A tiny pixel run that the session shares (conftest's ``pixel_run``, ``conditional_run``): 8x8 images of the
    bundled sample."""
    return PixelRun(out, train_pixel_run(out, *extra, steps=steps, limit=limit), steps, limit)


@dataclass
class PriorPipeline:
    """The artefacts of train-vqvae (2 levels) -> extract-codes train/test -> train-prior top and bottom, with the
    result of every command (for their messages) and the sizes it was built with."""
    vqvae: Path
    train_codes: Path
    test_codes: Path
    top: Path
    bottom: Path
    steps: int
    train_items: int
    test_items: int
    results: dict[str, Result] = field(default_factory=dict)


def build_prior_pipeline(root: Path, steps: int = 2, train_items: int = 16, test_items: int = 16) -> PriorPipeline:
    """16x16 images -> VQ-VAE codes: top 4x4 and bottom 8x8, 16 codes each (the tiny VQ-VAE preset)."""
    p = PriorPipeline(root / "vq" / "latest.pt", root / "train.lmdb", root / "test.lmdb", root / "top" / "latest.pt",
                      root / "bottom" / "latest.pt", steps, train_items, test_items)
    train = ["--steps", steps, *TINY_TRAIN]
    p.results["train-vqvae"] = check_ok(run_cli(
        "train-vqvae", "--dataset", "sample", "--image-size", "16", "--levels", "2", "--limit", train_items,
        *train, "--out", p.vqvae.parent))
    for split, out, n in (("train", p.train_codes, train_items), ("test", p.test_codes, test_items)):
        p.results[f"extract-{split}"] = check_ok(run_cli(
            "extract-codes", "--vqvae", p.vqvae, "--split", split, "--limit", n, "--out", out, "--quiet",
            "--device", "cpu"))
    codes = ["--codes", p.train_codes, "--val-codes", p.test_codes]
    p.results["train-prior-top"] = check_ok(run_cli(
        "train-prior", *codes, "--level", "top", "--class-conditional", *train, "--out", p.top.parent))
    p.results["train-prior-bottom"] = check_ok(run_cli(
        "train-prior", *codes, "--level", "bottom", *train, "--out", p.bottom.parent))
    return p


@dataclass
class LevelsPipeline:
    """A 3-level VQ-VAE (16x16 images: top 2x2, middle 4x4, bottom 8x8 codes, 16 codes each), its train/test code
    caches and a prior per level (the top one class-conditional), with the result of every command."""
    vqvae: Path
    train_codes: Path
    test_codes: Path
    priors: dict[str, Path]  # level name -> prior checkpoint
    results: dict[str, Result] = field(default_factory=dict)


def build_levels_pipeline(root: Path, levels: int = 3, steps: int = 2, train_items: int = 32,
                          test_items: int = 8) -> LevelsPipeline:
    """train-vqvae --levels N -> extract-codes train/test -> train-prior --level L for every level."""
    from vqprior.levels import level_names

    names = level_names(levels)
    p = LevelsPipeline(root / "vq" / "latest.pt", root / "train.lmdb", root / "test.lmdb",
                       {name: root / name / "latest.pt" for name in names})
    train = ["--steps", steps, *TINY_TRAIN]
    p.results["train-vqvae"] = check_ok(run_cli(
        "train-vqvae", "--dataset", "sample", "--image-size", "16", "--levels", levels, "--limit", train_items,
        *train, "--out", p.vqvae.parent))
    for split, out, n in (("train", p.train_codes, train_items), ("test", p.test_codes, test_items)):
        p.results[f"extract-{split}"] = check_ok(run_cli(
            "extract-codes", "--vqvae", p.vqvae, "--split", split, "--limit", n, "--out", out, "--quiet",
            "--device", "cpu"))
    for name in names:
        flags = ["--class-conditional"] if name == "top" else []
        p.results[f"train-prior-{name}"] = check_ok(run_cli(
            "train-prior", "--codes", p.train_codes, "--val-codes", p.test_codes, "--level", name, *flags, *train,
            "--out", p.priors[name].parent))
    return p
