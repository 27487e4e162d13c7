"""Bad-input table (see tests/bad_inputs.py) for hierarchies of more than two levels: a prior missing for a level,
a prior of the wrong level or of another VQ-VAE, codes of the wrong depth; one-line errors, nothing written.
``{top3}``, ``{middle3}``, ``{bottom3}``, ``{vq3}``, ``{codes3}`` are the 3-level pipeline (conftest
``levels_pipeline``); the other names are the shared 2-level artefacts."""
from __future__ import annotations

import numpy as np
import pytest

from bad_inputs import PRIOR, case, check_bad_input, codes_npz, image_in_png, snapshot
from cli_support import check_ok, run_cli

THREE = "--middle {middle3} --bottom {bottom3}"


def compressed_3_level(d, a) -> None:
    check_ok(run_cli("compress", a["top3"], a["codes3"], "--out", d / "c.vqz", "--middle", a["middle3"],
                     "--bottom", a["bottom3"], "--device", "cpu"))


CASES = [
    # sample / complete: one prior per level
    case("sample-3-levels-without-middle", "sample {top3} --bottom {bottom3} --out out.png", "--middle"),
    case("sample-3-levels-without-bottom", "sample {top3} --middle {middle3} --out out.png", "--bottom"),
    case("sample-middle-prior-as-ckpt", "sample {middle3} --bottom {bottom3} --out out.png", "middle prior"),
    case("sample-bottom-given-as-middle", "sample {top3} --middle {bottom3} --bottom {bottom3} --out out.png",
         "not one of"),
    case("sample-middle-given-twice", f"sample {{top3}} --middle {{middle3}} {THREE} --out out.png", "two middle"),
    case("sample-middle-for-2-levels", "sample {top} --middle {middle3} --bottom {bottom} --out out.png",
         "--middle given"),
    case("sample-bottom-of-another-vqvae", "sample {top3} --middle {middle3} --bottom {bottom} --out out.png",
         "different VQ-VAEs"),
    case("sample-middle-for-pixel-model", "sample {px} --middle {middle3} --out out.png", "code priors"),
    case("complete-3-levels-without-middle",
         "complete {top3} --bottom {bottom3} --image in.png --keep-rows 8 --out out.png", "--middle", image_in_png),
    # compress / decompress
    case("compress-3-levels-without-middle", "compress {top3} {codes3} --bottom {bottom3} --out c.vqz", "--middle"),
    case("compress-middle-for-pixel-model", "compress {px} in.png --middle {middle3} --out c.vqz", "code priors",
         image_in_png),
    case("decompress-3-levels-without-middle", "decompress {top3} c.vqz --bottom {bottom3} --out o.npz", "--middle",
         compressed_3_level),
    case("decompress-3-levels-to-npy", f"decompress {{top3}} c.vqz {THREE} --out o.npy", "npz",
         compressed_3_level),
    case("compress-2-level-cache-with-3-priors", f"compress {{top3}} {{test_codes}} {THREE} --out c.vqz",
         "2 code level"),
    # train-prior, evaluate, decode
    case("middle-level-of-2-level-cache", f"train-prior --codes {{train_codes}} --level middle --out run {PRIOR}",
         "no middle level"),
    case("middle2-level-of-3-level-cache", f"train-prior --codes {{codes3}} --level middle2 --out run {PRIOR}",
         "no middle2 level"),
    case("unknown-level-name", f"train-prior --codes {{codes3}} --level centre --out run {PRIOR}", "--level"),
    case("evaluate-3-level-bottom-on-2-level-codes", "evaluate {bottom3} --codes {test_codes} --quiet",
         "3-level VQ-VAE"),
    case("decode-2-level-codes-with-3-level-vqvae", "decode --vqvae {vq3} two.npz --out out.png", "3 level",
         codes_npz("two.npz", top=np.zeros((2, 2, 2), np.int64), bottom=np.zeros((2, 8, 8), np.int64))),
    case("decode-3-level-codes-wrong-middle-shape", "decode --vqvae {vq3} three.npz --out out.png",
         "middle codes must have shape",
         codes_npz("three.npz", top=np.zeros((2, 2, 2), np.int64), middle=np.zeros((2, 2, 2), np.int64),
                   bottom=np.zeros((2, 8, 8), np.int64))),
    case("train-vqvae-too-many-levels", "train-vqvae --preset tiny --levels 9 --steps 1 --out run --quiet",
         "--levels"),
]


@pytest.fixture(scope="module")
def artefacts(bad_input_artefacts, levels_pipeline):
    p = levels_pipeline
    return {**bad_input_artefacts, "top3": p.priors["top"], "middle3": p.priors["middle"],
            "bottom3": p.priors["bottom"], "vq3": p.vqvae, "codes3": p.test_codes, "levels_root": p.vqvae.parents[1]}


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad, artefacts, tmp_path, monkeypatch):
    before = snapshot(artefacts["levels_root"])
    check_bad_input(bad, artefacts, tmp_path, monkeypatch)
    assert snapshot(artefacts["levels_root"]) == before  # the 3-level inputs untouched too
