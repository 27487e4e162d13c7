"""Every bad input to every ``vqprior`` command is a one-line ``Error: ...`` and a non-zero exit: no traceback, no
uncaught exception, and nothing written (no partial output, no stray temp file, no half-made run folder).

One table (CASES) drives one test. Each case names the command line (``{name}`` fields are filled with the shared
tiny artefacts; relative paths land in the test's own empty folder), a word the error line must contain, and
optionally a setup that writes the bad file(s) first. Inputs that look odd but must work are checked at the end.
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

from cli_support import TINY_TRAIN, build_prior_pipeline, check_ok, run_cli, train_pixel_run

TRAIN_FAST = ["--preset", "tiny", "--image-size", "8", "--steps", "1", "--batch-size", "4", "--num-samples", "2",
              "--eval-limit", "4", "--quiet", "--device", "cpu"]




def write_images(folder: Path, count: int, size=(8, 8), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict[str, Path]:
    """Tiny real artefacts: a pixel run, a 2-level VQ-VAE pipeline (class-conditional top prior), and a 1-level
    VQ-VAE with 8 codes (a different codebook) with its own code cache; plus an unlabeled image folder and a
    1-channel 'mnist' folder."""
    root = tmp_path_factory.mktemp("artefacts")
    train_pixel_run(root / "px", steps=1, limit=16)
    p = build_prior_pipeline(root, steps=1, train_items=16, test_items=8)
    check_ok(run_cli("train-vqvae", "--dataset", "sample", "--image-size", "16", "--levels", "1", "--codebook-size",
                     "8", "--limit", "16", "--steps", "1", *TINY_TRAIN, "--out", root / "vq1"))
    check_ok(run_cli("extract-codes", "--vqvae", root / "vq1" / "latest.pt", "--split", "test", "--limit", "8",
                     "--out", root / "other.lmdb", "--quiet", "--device", "cpu"))
    write_images(root / "images", 24)
    (root / "mnist").mkdir()
    for split in ("train", "test"):
        np.savez(root / "mnist" / f"{split}.npz", images=np.zeros((8, 28, 28), np.uint8), labels=np.zeros(8, np.int64))
    return {"root": root, "px": root / "px" / "latest.pt", "px_dir": root / "px", "vq": p.vqvae,
            "top": p.top, "bottom": p.bottom, "train_codes": p.train_codes, "test_codes": p.test_codes,
            "vq1": root / "vq1" / "latest.pt", "other_codes": root / "other.lmdb", "images": root / "images",
            "mnist": root / "mnist"}


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


def read_only_folder(d: Path, a) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o500)


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

CASES = [
    # checkpoints
    case("missing-checkpoint", "sample nope.pt --out out.png", "not found"),
    case("folder-as-checkpoint", "sample adir --out out.png", "folder", make_dirs("adir")),
    case("empty-checkpoint", "evaluate empty.pt", "empty", write_bytes("empty.pt", b"")),
    case("truncated-checkpoint", "sample cut.pt --out out.png", "truncated", truncated("px", "cut.pt")),
    case("random-bytes-checkpoint", "decode noise.pt codes.npz --out out.png", "not a PyTorch checkpoint",
         write_bytes("noise.pt", np.random.default_rng(0).bytes(4096))),
    case("torch-file-not-ours", "sample other.pt --out out.png", "no format header", torch_file("other.pt", {"a": 1})),
    case("newer-format", "sample new.pt --out out.png", "newer",
         torch_file("new.pt", {"format_version": 99, "kind": "pixels"})),
    case("vqvae-given-to-sample", "sample {vq} --out out.png", "vqvae checkpoint"),
    case("vqvae-given-to-evaluate", "evaluate {vq}", "vqvae checkpoint"),
    case("pixels-given-to-decode", "decode {px} codes.npz --out out.png", "pixels checkpoint"),
    case("pixels-given-to-extract", "extract-codes --vqvae {px} --out codes.lmdb", "pixels checkpoint"),
    case("pickled-object-checkpoint", "sample evil.pt --out out.png", "pickled", evil_checkpoint, evil_never_ran),
    # code caches and priors
    case("unfinished-cache-train", f"train-prior --codes unfinished.lmdb --out run {PRIOR}", "unfinished",
         unfinished_cache),
    case("unfinished-cache-evaluate", "evaluate {top} --codes unfinished.lmdb", "unfinished", unfinished_cache),
    case("foreign-lmdb", "evaluate {top} --codes foreign.lmdb", "not a vqprior code cache", foreign_lmdb),
    case("missing-cache", f"train-prior --codes nowhere.lmdb --out run {PRIOR}", "not found"),
    case("codebook-size-mismatch", "evaluate {top} --codes {other_codes}", "codebook size mismatch"),
    case("val-codes-of-another-vqvae",
         f"train-prior --codes {{train_codes}} --val-codes {{other_codes}} --out run {PRIOR}", "different VQ-VAE"),
    case("vqvae-not-the-caches", f"train-prior --codes {{train_codes}} --vqvae {{vq1}} --out run {PRIOR}", "sha256"),
    case("bottom-level-of-1-level-cache", f"train-prior --codes {{other_codes}} --level bottom --out run {PRIOR}",
         "no bottom level"),
    case("resume-run-of-another-kind", "train-prior --codes {train_codes} --out {px_dir} --resume --quiet",
         "pixels checkpoint"),
    case("extract-over-finished-cache", "extract-codes --vqvae {vq} --split test --limit 4 --out {test_codes} --quiet",
         "--overwrite"),
    case("extract-1-channel-data", "extract-codes --vqvae {vq} --dataset mnist --data-dir {mnist} --out c.lmdb",
         "3-channel"),
    case("bottom-prior-sampled-alone", "sample {bottom} --out out.png", "bottom prior"),
    case("top-prior-without-bottom", "sample {top} --out out.png", "--bottom"),
    case("top-prior-given-as-bottom", "sample {top} --bottom {top} --out out.png", "not a bottom prior"),
    case("bottom-for-pixel-model", "sample {px} --bottom {bottom} --out out.png", "code priors"),
    case("save-codes-for-pixel-model", "sample {px} --save-codes c.npy --out out.png", "--save-codes"),
    case("evaluate-prior-without-codes", "evaluate {top}", "needs --codes"),
    case("evaluate-pixels-with-codes", "evaluate {px} --codes {test_codes}", "for priors"),
    case("evaluate-pixels-on-1-channel-data", "evaluate {px} --dataset mnist --data-dir {mnist} --quiet", "trained on"),
    # codes files for decode
    case("codes-outside-codebook-npz", "decode {vq} oor.npz --out out.png", "outside the codebook", OOR_NPZ),
    case("codes-outside-codebook-npy", "decode {vq1} oor.npy --out out.png", "outside the codebook",
         codes_npy("oor.npy", np.full((2, 8, 8), 8, np.int64))),
    case("codes-negative", "decode {vq1} neg.npy --out out.png", "outside the codebook",
         codes_npy("neg.npy", np.full((2, 8, 8), -1, np.int64))),
    case("codes-wrong-shape-npz", "decode {vq} shape.npz --out out.png", "must have shape",
         codes_npz("shape.npz", top=np.zeros((2, 3, 3), np.int64), bottom=np.zeros((2, 8, 8), np.int64))),
    case("codes-2d-npy", "decode {vq1} flat.npy --out out.png", r"shape \(N, H, W\)",
         codes_npy("flat.npy", np.zeros((8, 8), np.int64))),
    case("codes-float-npy", "decode {vq1} float.npy --out out.png", "integer",
         codes_npy("float.npy", np.zeros((2, 8, 8), np.float32))),
    case("codes-npz-missing-keys", "decode {vq} top.npz --out out.png", "'top' and 'bottom'",
         codes_npz("top.npz", top=np.zeros((2, 4, 4), np.int64))),
    case("codes-one-level-for-two", "decode {vq} one.npy --out out.png", "2 level",
         codes_npy("one.npy", np.zeros((2, 8, 8), np.int64))),
    case("codes-truncated-npz", "decode {vq} cut.npz --out out.png", "not a readable", truncated_npz),
    case("codes-random-bytes", "decode {vq} noise.npy --out out.png", "not a .npy/.npz",
         write_bytes("noise.npy", b"\x80\x04definitely not numpy")),
    case("codes-object-array", "decode {vq} obj.npz --out out.png", "object arrays",
         codes_npz("obj.npz", top=np.array([None, 1], dtype=object), bottom=np.zeros((2, 8, 8), np.int64))),
    # options
    case("num-zero", "sample {px} --num 0 --out out.png", "--num"),
    case("num-negative", "sample {px} --num -1 --out out.png", "--num"),
    case("steps-zero", "train-pixels --steps 0 --out run --quiet", "--steps"),
    case("temperature-zero", "sample {px} --temperature 0 --out out.png", "--temperature"),
    case("top-p-zero", "sample {top} --bottom {bottom} --top-p 0 --out out.png", "--top-p"),
    case("top-k-negative", "sample {px} --top-k -1 --out out.png", "--top-k"),
    case("unknown-preset", "train-pixels --preset huge --out run --quiet", "preset"),
    case("unknown-preset-receptive-field", "receptive-field --preset huge --out out.png", "unknown preset"),
    case("unknown-precision", "train-pixels --precision fp16 --out run --quiet", "--precision"),
    case("class-on-unconditional-model", "sample {px} --class 1 --out out.png", "not class-conditional"),
    case("class-out-of-range", "sample {top} --bottom {bottom} --class 10 --out out.png", r"\[0, 9\]"),
    case("class-negative", "sample {top} --bottom {bottom} --class -1 --out out.png", r"\[0, 9\]"),
    case("class-conditional-unlabeled-folder",
         f"train-pixels --dataset folder --data-dir {{images}} --class-conditional --out run {TRAIN}",
         "no class labels"),
    case("image-size-not-divisible-by-stride",
         "train-vqvae --preset tiny --levels 2 --image-size 10 --limit 8 --steps 1 --out run --quiet --device cpu",
         "divisible"),
    case("device-cuda-unavailable", "sample {px} --device cuda --out out.png", "CUDA", marks=NO_CUDA),
    case("device-unknown", "sample {px} --device tpu --out out.png", "unknown device"),
    # data
    case("empty-image-folder", f"train-pixels --dataset folder --data-dir imgs --out run {TRAIN}", "empty",
         make_dirs("imgs")),
    case("empty-image-folder-existing-run-folder", f"train-pixels --dataset folder --data-dir imgs --out run {TRAIN}",
         "empty", make_dirs("imgs", "run")),
    case("non-image-folder", f"train-pixels --dataset folder --data-dir docs --out run {TRAIN}", "none ending",
         folder_of_files("docs", "a.txt", "b.csv")),
    case("unreadable-images", f"train-pixels --dataset folder --data-dir fake --out run {TRAIN}",
         "not a readable image", folder_of_files("fake", "0.png", "1.png", "2.png")),
    case("mixed-sizes-without-image-size",
         "train-pixels --dataset folder --data-dir mixed --preset tiny --steps 1 --out run --quiet", "differ in size",
         mixed_sizes),
    case("cifar10-empty-data-dir", f"train-pixels --dataset cifar10 --data-dir c10 --out run {TRAIN}",
         "no cifar10 data", make_dirs("c10")),
    case("cifar10-missing-data-dir", f"train-pixels --dataset cifar10 --out run {TRAIN}", "needs --data-dir"),
    case("mnist-nonexistent-data-dir", f"train-pixels --dataset mnist --data-dir nowhere --out run {TRAIN}",
         "not found"),
    # outputs
    case("sample-out-in-missing-folder", "sample {px} --out /nonexistent/dir/x.png", "does not exist"),
    case("save-array-in-missing-folder", "sample {px} --out out.png --save-array /nonexistent/dir/x.npy",
         "does not exist"),
    case("sample-out-is-a-folder", "sample {px} --out adir", "directory", make_dirs("adir")),
    case("sample-out-read-only-folder", "sample {px} --out ro/x.png", "not writable", read_only_folder,
         marks=NOT_ROOT),
    case("train-out-is-a-file", f"train-pixels --out afile {TRAIN}", "is a file", write_bytes("afile", b"x")),
    case("train-into-existing-run", f"train-pixels --out {{px_dir}} {TRAIN}", "--resume"),
    case("extract-out-is-a-file", "extract-codes --vqvae {vq} --limit 4 --out afile --quiet", "file exists",
         write_bytes("afile", b"x")),
    case("decode-out-in-missing-folder", "decode {vq} {px} --out /nonexistent/dir/x.png", "does not exist"),
    # export
    case("export-missing-checkpoint", "export nothing.pt --out small.pt", "not found"),
    case("export-onto-itself", "export {px} --out {px}", "replace"),
    case("export-truncated-checkpoint", "export cut.pt --out small.pt", "truncated", truncated("px", "cut.pt")),
    case("export-pickled-object-checkpoint", "export evil.pt --out small.pt", "pickled", evil_checkpoint,
         evil_never_ran),
    # receptive field
    case("position-outside-map", "receptive-field --preset tiny --size 8 --position 8,0 --out out.png", "outside"),
    case("position-outside-checkpoint-map", "receptive-field {px} --position 0,9 --out out.png", "outside"),
    case("position-malformed", "receptive-field --preset tiny --position x --out out.png", "R,C"),
    case("receptive-field-neither-source", "receptive-field --out out.png", "exactly one"),
    case("receptive-field-compare-with-checkpoint", "receptive-field {px} --compare --out out.png", "--preset only"),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` with size and mtime (LMDB lock files only by name: readers may touch them)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        st = p.lstat()
        out[rel] = (p.is_dir(),) if p.is_dir() or p.name == "lock.mdb" else (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad: Case, artefacts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if bad.setup:
        bad.setup(tmp_path, artefacts)
    before, shared_before = snapshot(tmp_path), snapshot(artefacts["root"])
    args = [a.format(**artefacts) for a in bad.args]

    result = run_cli(*args)

    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    assert result.exit_code not in (0, None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert re.search(bad.word, errors[0], re.IGNORECASE), errors[0]
    assert snapshot(tmp_path) == before  # no output, temp file or run folder left behind
    assert snapshot(artefacts["root"]) == shared_before  # inputs untouched
    if bad.check:
        bad.check(tmp_path)


def test_the_table_covers_every_command():
    from vqprior.commands.cli import cli

    covered = {c.values[0].args[0] for c in CASES}
    # complete's and plot's bad inputs live with their own tests (tests/test_plot.py has plot's table)
    assert covered >= set(cli.commands) - {"complete", "plot"}


# --- inputs that look unusual but must work ---------------------------------------------------------------------

def test_folder_of_mixed_image_modes_trains(tmp_path):
    """Grayscale, RGBA, 16-bit, palette, gray+alpha, 1-bit and CMYK JPEG images all become RGB."""
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "I;16", "P", "RGB", "LA", "CMYK", "1"]
    for i in range(24):
        mode = modes[i % len(modes)]
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16))
        else:
            image = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(mode)
        image.save(folder / f"{i:02d}.{'jpg' if mode == 'CMYK' else 'png'}")
    result = check_ok(run_cli("train-pixels", "--dataset", "folder", "--data-dir", folder, *TRAIN_FAST,
                              "--out", tmp_path / "run"))
    assert "3x8x8" in result.output
    assert (tmp_path / "run" / "latest.pt").exists()


def test_failed_fresh_run_leaves_no_nested_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    result = run_cli("train-pixels", "--dataset", "folder", "--data-dir", "imgs", *TRAIN_FAST, "--out", "a/b/run")
    assert result.exit_code == 1 and "empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


# --- a full disk, simulated with a file-size limit on a real subprocess --------------------------------------------

def _limit_file_size(limit: int):
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs setrlimit in a child process")
@pytest.mark.parametrize("what,command", [
    ("png", "sample {px} --num 16 --scale 8 --out out.png --device cpu"),
    ("checkpoint", f"train-pixels --out run {TRAIN}"),
    ("lmdb", "extract-codes --vqvae {vq} --limit 8 --out codes.lmdb --quiet --device cpu"),
])
def test_full_disk_is_a_one_line_error_and_writes_nothing(what, command, artefacts, tmp_path):
    import subprocess
    import sys

    args = [a.format(**artefacts) for a in command.split()]
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vqprior.commands.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, preexec_fn=_limit_file_size(2048), timeout=300)
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr
    assert re.search("too large|space", errors[0], re.IGNORECASE), errors[0]
    assert snapshot(tmp_path) == before, what
