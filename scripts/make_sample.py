"""Build the bundled CIFAR-10 sample (``vqprior/data/sample/cifar10_sample.npz``) from the real CIFAR-10 npz files.

The sample is a deterministic, class-balanced subset: the first ``--train-per-class`` images of every class of
``train.npz`` and the first ``--test-per-class`` of ``test.npz``, in original order. Pixels are stored losslessly as
one PNG mosaic per split (PNG packs CIFAR about 25 % tighter than deflate over raw bytes), held inside the npz as a
uint8 byte array, so loading needs only numpy and Pillow and no pickle. Provenance travels in the same file: the
source files' sha256 and the original index of every image.

    python scripts/make_sample.py --src DIR_WITH_CIFAR10_NPZ --out vqprior/data/sample/cifar10_sample.npz
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from vqprior.data.mosaic import MOSAIC_COLUMNS, decode_mosaic_png, encode_mosaic_png
from vqprior.io import atomic_write, file_sha256

FORMAT_VERSION = 1


def select_class_balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of every class, sorted (deterministic, original order)."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} images, fewer than {per_class}")
        chosen.append(members[:per_class])
    return np.sort(np.concatenate(chosen))


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
    arrays["source_sha256"] = np.array([file_sha256(src / "train.npz"), file_sha256(src / "test.npz")])
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
