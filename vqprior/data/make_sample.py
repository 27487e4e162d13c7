"""Build the bundled CIFAR-10 sample (``vqprior/data/sample/cifar10_sample.npz``) from the real CIFAR-10 npz files.

The sample is a deterministic, class-balanced subset: the first ``--train-per-class`` images of every class of
``train.npz`` and the first ``--test-per-class`` of ``test.npz``, in original order. Pixels are stored losslessly as
one PNG mosaic per split (PNG packs CIFAR about 25 % tighter than deflate over raw bytes), held inside the npz as a
uint8 byte array, so loading needs only numpy and Pillow and no pickle. Provenance travels in the same file: the
source files' sha256 and the original index of every image.

    python -m vqprior.data.make_sample --src /work/shared/data/cifar10 --out vqprior/data/sample/cifar10_sample.npz
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write

FORMAT_VERSION = 1
MOSAIC_COLUMNS = 50  # images per mosaic row; any value works, this one keeps the PNG near-square


def select_class_balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of every class, sorted (deterministic, original order)."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} images, fewer than {per_class}")
        chosen.append(members[:per_class])
    return np.sort(np.concatenate(chosen))


def encode_mosaic_png(images: np.ndarray, columns: int = MOSAIC_COLUMNS) -> np.ndarray:
    """uint8 (N, H, W, 3) -> PNG bytes (as a uint8 array) of a mosaic, ``columns`` images per row, zero-padded."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, h, w, c), dtype=np.uint8)
    padded[:n] = images
    mosaic = padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)
    buffer = io.BytesIO()
    Image.fromarray(mosaic).save(buffer, format="PNG", optimize=True)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def decode_mosaic_png(png: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """Inverse of ``encode_mosaic_png``: PNG bytes -> uint8 (count, height, width, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(png.tobytes())) as im:
        mosaic = np.asarray(im.convert("RGB"))
    rows, columns = mosaic.shape[0] // height, mosaic.shape[1] // width
    tiles = mosaic.reshape(rows, height, columns, width, 3).transpose(0, 2, 1, 3, 4).reshape(-1, height, width, 3)
    return tiles[:count]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sample(src: Path, out: Path, train_per_class: int, test_per_class: int) -> dict[str, int]:
    """Write the sample npz atomically; return the image counts and the file size in bytes."""
    arrays: dict[str, np.ndarray] = {"format_version": np.array(FORMAT_VERSION, dtype=np.int64)}
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        with np.load(src / f"{split}.npz", allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        indices = select_class_balanced(labels, per_class)
        png = encode_mosaic_png(images[indices])
        # Lossless by construction, but prove it before writing: the sample must equal the source pixels.
        if not np.array_equal(decode_mosaic_png(png, len(indices), 32, 32), images[indices]):
            raise RuntimeError("PNG mosaic round trip changed pixels")
        arrays[f"{split}_png"] = png
        arrays[f"{split}_labels"] = labels[indices].astype(np.uint8)
        arrays[f"{split}_indices"] = indices.astype(np.int64)
        counts[split] = len(indices)
    arrays["source_files"] = np.array(["train.npz", "test.npz"])
    arrays["source_sha256"] = np.array([_sha256(src / "train.npz"), _sha256(src / "test.npz")])
    arrays["description"] = np.array(
        f"CIFAR-10 (Krizhevsky 2009) class-balanced subset: first {train_per_class} train and {test_per_class} "
        "test images of each class in original order; *_indices are positions in the source train.npz / "
        "test.npz; pixels are a lossless PNG mosaic of 32x32 tiles, row-major, "
        f"{MOSAIC_COLUMNS} per row")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temp name
            np.savez(f, **arrays)  # the PNG bytes are already compressed; deflate would only add load time

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    os.chmod(out, 0o644)  # package data must be world-readable; atomic_write's temp file starts as 0600
    counts["bytes"] = out.stat().st_size
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="folder with CIFAR-10 train.npz and test.npz")
    parser.add_argument("--out", type=Path, required=True, help="output .npz")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    counts = build_sample(args.src, args.out, args.train_per_class, args.test_per_class)
    print(f"wrote {args.out}: {counts['train']} train + {counts['test']} test images, {counts['bytes']:,} bytes")


if __name__ == "__main__":
    main()
