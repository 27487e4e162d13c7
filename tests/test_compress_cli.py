"""``vqprior compress`` / ``decompress`` end to end on tiny trained checkpoints: PNG, folder (names kept) and .npy
round trips for a pixel model; LMDB caches, .npz codes and images (lossy: bits/pixel and PSNR) for top + bottom
priors; and this feature's bad-input table (one-line ``Error:``, non-zero exit, nothing written)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import check_ok, run_cli, snapshot, train_pixel_run
from vqprior.data.codes import CodeDataset

pytest.importorskip("constriction")


def write_pngs(folder: Path, count: int, size=(8, 8), mode="RGB", seed=0) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im, mode).save(folder / f"img_{i}.png")
    return images


@pytest.fixture(scope="module")
def art(tmp_path_factory, pixel_run, prior_pipeline) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress")
    p = prior_pipeline  # 16x16 images, top 4x4 + bottom 8x8
    train_pixel_run(root / "px2", "--seed", "3", steps=1, limit=16)  # another model
    write_pngs(root / "pngs", 3)
    write_pngs(root / "pngs16", 2, size=(16, 16))
    np.save(root / "images.npy", np.random.default_rng(1).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8))
    check_ok(run_cli("compress", pixel_run.checkpoint, root / "images.npy", "--out", root / "good.vqz",
                     "--device", "cpu"))
    check_ok(run_cli("compress", p.top, p.test_codes, "--bottom", p.bottom, "--out", root / "codes.vqz",
                     "--device", "cpu"))
    return {"root": root, "px": pixel_run.checkpoint, "px2": root / "px2" / "latest.pt", "top": p.top,
            "bottom": p.bottom, "codes": p.test_codes, "pngs": root / "pngs", "pngs16": root / "pngs16",
            "npy": root / "images.npy", "good": root / "good.vqz", "codes_vqz": root / "codes.vqz"}


def test_pixel_npy_png_and_folder_round_trips(art, tmp_path):
    check_ok(run_cli("decompress", art["px"], art["good"], "--out", tmp_path / "back.npy", "--device", "cpu"))
    assert np.array_equal(np.load(tmp_path / "back.npy"), np.load(art["npy"]))

    out = check_ok(run_cli("compress", art["px"], art["pngs"], "--out", tmp_path / "f.vqz", "--batch-size", "2",
                           "--device", "cpu")).output
    assert re.search(r"3 image\(s\) 3x8x8 .* bytes \(\d+ header\) = [\d.]+ bits/dim", out)
    check_ok(run_cli("decompress", art["px"], tmp_path / "f.vqz", "--out", tmp_path / "folder", "--device", "cpu"))
    names = sorted(p.name for p in art["pngs"].iterdir())
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == names
    for n in names:
        assert np.array_equal(np.asarray(Image.open(art["pngs"] / n)), np.asarray(Image.open(tmp_path / "folder" / n)))

    one = art["pngs"] / names[0]
    check_ok(run_cli("compress", art["px"], one, "--out", tmp_path / "one.vqz", "--device", "cpu"))
    check_ok(run_cli("decompress", art["px"], tmp_path / "one.vqz", "--out", tmp_path / "one.png", "--device", "cpu"))
    assert np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(tmp_path / "one.png")))
    (tmp_path / "empty").mkdir()  # an empty folder may be the output
    check_ok(run_cli("decompress", art["px"], tmp_path / "one.vqz", "--out", tmp_path / "empty", "--device", "cpu"))
    assert len(list((tmp_path / "empty").iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files or folders left


def test_code_cache_npz_and_images_with_priors(art, tmp_path):
    pri = ["--bottom", art["bottom"], "--device", "cpu"]
    check_ok(run_cli("decompress", art["top"], art["codes_vqz"], "--out", tmp_path / "c.npz", *pri))
    ds = CodeDataset(art["codes"])
    with np.load(tmp_path / "c.npz") as z:
        for level in ("top", "bottom"):
            assert np.array_equal(z[level], torch.stack([ds[i][level] for i in range(len(ds))]).numpy())
    # The decoded .npz compresses to the very same file.
    check_ok(run_cli("compress", art["top"], tmp_path / "c.npz", "--out", tmp_path / "again.vqz", *pri))
    assert (tmp_path / "again.vqz").read_bytes() == art["codes_vqz"].read_bytes()

    out = check_ok(run_cli("compress", art["top"], art["pngs16"], "--out", tmp_path / "img.vqz", *pri)).output
    assert re.search(r"[\d.]+ bits/code .* [\d.]+ bits/pixel, reconstruction PSNR [\d.]+ dB", out), out
    check_ok(run_cli("decompress", art["top"], tmp_path / "img.vqz", "--out", tmp_path / "recon", *pri))
    assert len(list((tmp_path / "recon").glob("*.png"))) == 2


def write(name, data):
    return lambda d, a: (d / name).write_bytes(data)


def corrupt(d, a):
    data = bytearray(a["good"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "bad.vqz").write_bytes(bytes(data))


def cut(d, a):
    (d / "cut.vqz").write_bytes(a["good"].read_bytes()[:-7])


def png(name, mode, size=(8, 8), **kw):
    def setup(d, a):
        Image.new(mode, size, **kw).save(d / name)
    return setup


def npy(name, array):
    return lambda d, a: np.save(d / name, array)


def full_folder(d, a):
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("mine")


def made_on(record: str):
    """The good file with its environment record replaced (CRC refit): as if compressed on another device."""
    def setup(d, a):
        from vqprior.compress import container, unpack

        header = unpack(a["good"].read_bytes())
        header.environment = record
        (d / "elsewhere.vqz").write_bytes(container.pack(header))
    return setup


CASES = [
    ("made-on-a-gpu", "decompress {px} elsewhere.vqz --out o.npy", r"compressed on CUDA \(NVIDIA H200",
     made_on(f"torch {torch.__version__} cuda gpu=NVIDIA_H200 cuda=12.8 cudnn=91002 constriction 0.4.1")),
    ("made-with-other-cpu-kernels", "decompress {px} elsewhere.vqz --out o.npy", "other CPU kernels",
     made_on(f"torch {torch.__version__} cpu NO_SUCH_KERNELS constriction 0.4.1")),
    ("not-ours", "decompress {px} notours.vqz --out o.npy", "not a vqprior compressed file",
     write("notours.vqz", b"hello world, not compressed")),
    ("corrupt", "decompress {px} bad.vqz --out o.npy", "corrupt or truncated", corrupt),
    ("truncated", "decompress {px} cut.vqz --out o.npy", "corrupt or truncated", cut),
    ("other-model", "decompress {px2} {good} --out o.npy", "another model", None),
    ("pixels-file-to-priors", "decompress {top} {good} --bottom {bottom} --out o.npz", "holds pixels", None),
    ("codes-file-to-pixels", "decompress {px} {codes_vqz} --out o.npy", "holds codes", None),
    ("missing-file", "decompress {px} nope.vqz --out o.npy", "not found", None),
    ("two-images-one-png", "decompress {px} {good} --out o.png", "do not fit one PNG", None),
    ("npz-out-for-pixels", "decompress {px} {good} --out o.npz", "code maps", None),
    ("npy-out-for-two-levels", "decompress {top} {codes_vqz} --bottom {bottom} --out o.npy", "npz", None),
    ("output-folder-not-empty", "decompress {px} {good} --out full", "not an empty folder", full_folder),
    ("output-parent-missing", "decompress {px} {good} --out no/where/o.npy", "does not exist", None),
    ("compress-output-parent-missing", "compress {px} {npy} --out no/where/o.vqz", "does not exist", None),
    ("float-npy", "compress {px} f.npy --out o.vqz", "uint8", npy("f.npy", np.zeros((2, 3, 8, 8), np.float32))),
    ("3d-npy", "compress {px} s.npy --out o.vqz", r"\(N, 3, H, W\)", npy("s.npy", np.zeros((3, 8, 8), np.uint8))),
    ("gray-npy-rgb-model", "compress {px} g.npy --out o.vqz", "uint8", npy("g.npy", np.zeros((2, 1, 8, 8), np.uint8))),
    ("rgba-png", "compress {px} a.png --out o.vqz", "RGBA PNG", png("a.png", "RGBA")),
    ("gray-png-rgb-model", "compress {px} l.png --out o.vqz", "L PNG", png("l.png", "L")),
    ("16-bit-png", "compress {px} w.png --out o.vqz", "PNG", png("w.png", "I;16")),
    ("jpeg-named-png", "compress {px} j.png --out o.vqz", "not a PNG", lambda d, a: Image.new("RGB", (8, 8)).save(
        d / "j.png", format="JPEG")),
    ("empty-folder", "compress {px} emptydir --out o.vqz", "no .png files", lambda d, a: (d / "emptydir").mkdir()),
    ("not-an-image-input", "compress {px} x.txt --out o.vqz", "must be a .png", write("x.txt", b"text")),
    ("missing-input", "compress {px} nope.png --out o.vqz", "not found", None),
    ("top-without-bottom", "compress {top} {codes} --out o.vqz", "--bottom", None),
    ("bottom-as-checkpoint", "compress {bottom} {codes} --out o.vqz", "bottom prior", None),
    ("bottom-for-pixels", "compress {px} {npy} --bottom {bottom} --out o.vqz", "--bottom applies", None),
    ("codes-out-of-range", "compress {top} oor.npz --bottom {bottom} --out o.vqz", "outside the codebook",
     lambda d, a: np.savez(d / "oor.npz", top=np.full((2, 4, 4), 99), bottom=np.zeros((2, 8, 8), np.int64))),
    ("images-wrong-size-for-priors", "compress {top} {pngs} --bottom {bottom} --out o.vqz", "must be 4x4", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, art, tmp_path, monkeypatch):
    _, args, word, setup = case
    monkeypatch.chdir(tmp_path)
    if setup:
        setup(tmp_path, art)
    before, shared = snapshot(tmp_path), snapshot(art["root"])
    result = run_cli(*[a.format(**art) for a in args.split()], "--device", "cpu")
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code not in (0, None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert re.search(word, errors[0], re.IGNORECASE), errors[0]
    assert snapshot(tmp_path) == before and snapshot(art["root"]) == shared
