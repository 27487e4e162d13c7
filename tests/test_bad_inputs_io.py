"""Bad-input table (see tests/bad_inputs.py): bad training data and bad output paths; and a full disk, simulated
with a file-size limit on a real subprocess."""
from __future__ import annotations

import os
import re

import pytest

from bad_inputs import (
    NOT_ROOT,
    TRAIN,
    case,
    check_bad_input,
    folder_of_files,
    image_in_png,
    make_dirs,
    mixed_sizes,
    read_only_folder,
    snapshot,
    write_bytes,
)

CASES = [
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
    case("image-suffix-unknown", "sample {px} --out out.xyz", "suffix"),
    case("image-without-suffix", "sample {px} --out grid", "without a suffix"),
    case("animation-suffix-not-animated", "sample {px} --out out.png --animate a.jpg", "animation"),
    case("decode-image-suffix-unknown", "decode --vqvae {vq} codes.npz --out out.txt", "suffix"),
    case("complete-image-suffix-unknown", "complete {px} --image in.png --keep-rows 2 --out out.npy", "suffix",
         image_in_png),
    case("receptive-field-suffix-unknown", "receptive-field --preset tiny --out rf.pt", "suffix"),
    case("out-dir-not-empty", "sample {px} --out-dir full", "--overwrite", folder_of_files("full", "keep.txt")),
    case("out-dir-is-a-file", "sample {px} --out-dir afile", "is a file", write_bytes("afile", b"x")),
    case("decode-out-in-missing-folder", "decode --vqvae {vq} {px} --out /nonexistent/dir/x.png", "does not exist"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad, bad_input_artefacts, tmp_path, monkeypatch):
    check_bad_input(bad, bad_input_artefacts, tmp_path, monkeypatch)


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
def test_full_disk_is_a_one_line_error_and_writes_nothing(what, command, bad_input_artefacts, tmp_path):
    import subprocess
    import sys

    args = [a.format(**bad_input_artefacts) for a in command.split()]
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vqprior.commands.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, preexec_fn=_limit_file_size(2048), timeout=600)
    assert proc.returncode not in (0, None), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr
    assert re.search("too large|space", errors[0], re.IGNORECASE), errors[0]
    assert snapshot(tmp_path) == before, what
