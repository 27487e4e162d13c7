"""Support for the bad-input tables (tests/test_bad_inputs_*.py): every bad input to every ``vqprior`` command is a
one-line ``Error: ...`` and a non-zero exit: no traceback, no uncaught exception, and nothing written (no partial
output, no stray temp file, no half-made run folder).

Each topic file has one table (CASES) driving one test through ``check_bad_input``. Each case names the command line
(``{name}`` fields are filled with the shared tiny artefacts of ``build_artefacts``, the session fixture
``bad_input_artefacts`` in conftest.py; relative paths land in the test's own empty folder), a word the error line
must contain, and optionally a setup that writes the bad file(s) first. Inputs that look odd but must work are
checked in test_odd_inputs.py.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import TINY_TRAIN, TRAIN_FAST, PixelRun, PriorPipeline, check_ok, run_cli, snapshot


def write_images(folder: Path, count: int, size=(8, 8), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def build_artefacts(root: Path, pixel_run: PixelRun, pipeline: PriorPipeline) -> dict[str, Path]:
    """Tiny real artefacts: the session's pixel run and 2-level VQ-VAE pipeline (class-conditional top prior), and a
    1-level VQ-VAE with 8 codes (a different codebook) with its own code cache; plus an unlabeled image folder and a
    1-channel 'mnist' folder. ``roots`` are the folders whose content no case may change."""
    p = pipeline
    check_ok(run_cli("train-vqvae", "--dataset", "sample", "--image-size", "16", "--levels", "1", "--codebook-size",
                     "8", "--limit", "16", "--steps", "1", *TINY_TRAIN, "--out", root / "vq1"))
    check_ok(run_cli("extract-codes", "--vqvae", root / "vq1" / "latest.pt", "--split", "test", "--limit", "8",
                     "--out", root / "other.lmdb", "--quiet", "--device", "cpu"))
    write_images(root / "images", 24)
    (root / "mnist").mkdir()
    for split in ("train", "test"):
        np.savez(root / "mnist" / f"{split}.npz", images=np.zeros((8, 28, 28), np.uint8), labels=np.zeros(8, np.int64))
    return {"roots": (root, pixel_run.folder, p.vqvae.parent.parent), "px": pixel_run.checkpoint,
            "px_dir": pixel_run.folder, "vq": p.vqvae, "top": p.top, "bottom": p.bottom, "train_codes": p.train_codes,
            "test_codes": p.test_codes, "vq1": root / "vq1" / "latest.pt", "other_codes": root / "other.lmdb",
            "images": root / "images", "mnist": root / "mnist"}


# --- bad files, written by a case's setup into the test's folder -------------------------------------------------

class Evil:
    """Unpickling it would create ``path``: a checkpoint carrying it must be refused without running it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_checkpoint(d: Path, a) -> None:
    torch.save({"format_version": 1, "kind": "pixels", "model": {}, "payload": Evil(str(d / "pwned"))}, d / "evil.pt")


def evil_never_ran(d: Path) -> None:
    assert not (d / "pwned").exists()
    torch.load(d / "evil.pt", weights_only=False)  # the trap is armed: plain unpickling does run it
    assert (d / "pwned").exists()


def truncated(src_key: str, name: str):
    def setup(d: Path, a) -> None:
        data = Path(a[src_key]).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return setup


def write_bytes(name: str, data: bytes):
    return lambda d, a: (d / name).write_bytes(data)


def torch_file(name: str, obj):
    return lambda d, a: torch.save(obj, d / name)


def make_dirs(*names: str):
    return lambda d, a: [(d / n).mkdir(parents=True) for n in names]


def codes_npz(name: str, **arrays):
    return lambda d, a: np.savez(d / name, **arrays)


def codes_npy(name: str, array):
    return lambda d, a: np.save(d / name, array)


def truncated_npz(d: Path, a) -> None:
    codes_npz("ok.npz", top=np.zeros((2, 4, 4), np.int64), bottom=np.zeros((2, 8, 8), np.int64))(d, a)
    data = (d / "ok.npz").read_bytes()
    (d / "cut.npz").write_bytes(data[: len(data) // 2])
    (d / "ok.npz").unlink()


def unfinished_cache(d: Path, a) -> None:
    shutil.copytree(a["test_codes"], d / "unfinished.lmdb")
    env = lmdb.open(str(d / "unfinished.lmdb"))
    with env.begin(write=True) as txn:
        assert txn.delete(b"__complete__")
    env.close()


def foreign_lmdb(d: Path, a) -> None:
    env = lmdb.open(str(d / "foreign.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()


def folder_of_files(folder: str, *names: str, content: bytes = b"not an image"):
    def setup(d: Path, a) -> None:
        (d / folder).mkdir()
        for n in names:
            (d / folder / n).write_bytes(content)
    return setup


def mixed_sizes(d: Path, a) -> None:
    write_images(d / "mixed", 20, size=(8, 8))
    write_images(d / "mixed" / "more", 20, size=(10, 12), seed=1)


def image_in_png(d: Path, a) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "in.png")


def read_only_folder(d: Path, a) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o500)


def exported_run(d: Path, a) -> None:
    (d / "exp").mkdir()
    check_ok(run_cli("export", a["px"], "--out", d / "exp" / "latest.pt"))


def copied_run(key: str, name: str):
    return lambda d, a: shutil.copytree(Path(a[key]).parent, d / name)


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple
    word: str  # regex the Error line must contain (case-insensitive)
    setup: Callable | None = None
    check: Callable | None = None  # extra assertions on the test folder afterwards


def case(id, args, word, setup=None, check=None, marks=()):
    return pytest.param(Case(id, tuple(args.split()) if isinstance(args, str) else tuple(args), word, setup, check),
                        id=id, marks=marks)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
NOT_ROOT = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
OOR_NPZ = codes_npz("oor.npz", top=np.full((2, 4, 4), 99), bottom=np.zeros((2, 8, 8), np.int64))
TRAIN = " ".join(TRAIN_FAST)
PRIOR = " ".join(a for a in TRAIN_FAST if a not in ("--image-size", "8"))  # no image size for codes


def check_bad_input(bad: Case, artefacts: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """Run one case: a one-line Error, a non-zero clean exit, the test folder and the shared artefacts unchanged."""
    monkeypatch.chdir(tmp_path)
    if bad.setup:
        bad.setup(tmp_path, artefacts)
    before, shared_before = snapshot(tmp_path), [snapshot(root) for root in artefacts["roots"]]
    args = [a.format(**artefacts) for a in bad.args]

    result = run_cli(*args)

    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    assert result.exit_code not in (0, None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert re.search(bad.word, errors[0], re.IGNORECASE), errors[0]
    assert snapshot(tmp_path) == before  # no output, temp file or run folder left behind
    assert [snapshot(root) for root in artefacts["roots"]] == shared_before  # inputs untouched
    if bad.check:
        bad.check(tmp_path)
