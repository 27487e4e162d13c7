"""Bad-input table (see tests/bad_inputs.py): bad checkpoints, code caches, codes files and exports."""
from __future__ import annotations

import numpy as np
import pytest

from bad_inputs import (OOR_NPZ, PRIOR, case, check_bad_input, codes_npy, codes_npz, evil_checkpoint,
                        evil_never_ran, foreign_lmdb, make_dirs, torch_file, truncated, truncated_npz, unfinished_cache,
                        write_bytes)

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
    case("vqvae-given-to-receptive-field", "receptive-field {vq} --out out.png", "vqvae checkpoint"),
    case("info-missing-checkpoint", "info nope.pt", "not found"),
    case("info-folder-as-checkpoint", "info adir", "folder", make_dirs("adir")),
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
    case("evaluate-vqvae-with-codes", "evaluate {vq} --codes {test_codes}", "for priors"),
    case("evaluate-vqvae-on-1-channel-data", "evaluate {vq} --dataset mnist --data-dir {mnist} --quiet", "channel"),
    # codes files for decode
    case("decode-without-vqvae", "decode codes.npz --out out.png", "--vqvae"),
    case("decode-two-codes-files", "decode --vqvae {vq} a.npz b.npz --out out.png", "one CODES"),
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
    # export
    case("export-missing-checkpoint", "export nothing.pt --out small.pt", "not found"),
    case("export-onto-itself", "export {px} --out {px}", "replace"),
    case("export-truncated-checkpoint", "export cut.pt --out small.pt", "truncated", truncated("px", "cut.pt")),
    case("export-pickled-object-checkpoint", "export evil.pt --out small.pt", "pickled", evil_checkpoint,
         evil_never_ran),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad, bad_input_artefacts, tmp_path, monkeypatch):
    check_bad_input(bad, bad_input_artefacts, tmp_path, monkeypatch)
