"""Write the out-of-distribution image sets of docs/ood.md as uint8 .npy arrays (N, C, H, W) for `vqprior score
--images`: MNIST and Fashion-MNIST test images drawn as 32x32 RGB (each 28x28 digit padded by 2 black pixels per
side, the gray value copied to the three channels: no interpolation, every pixel kept), constant images (one
uniformly random colour each) and uniform noise (every sub-pixel uniform 0..255).

    python scripts/ood_sets.py --data ../shared/data --out ood_sets --count 1000 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def padded_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> (N, 3, 32, 32): 2 black pixels around, gray copied to R, G and B."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[:, None], 3, axis=1)


def synthetic(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "constant":
        colours = rng.integers(0, 256, (count, 3, 1, 1), dtype=np.uint8)
        return np.ascontiguousarray(np.broadcast_to(colours, (count, 3, 32, 32)))
    return rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding mnist/ and fashion_mnist/ test.npz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=1000, help="images per set (the first N test images)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for name, folder in (("mnist32", "mnist"), ("fashion32", "fashion_mnist")):
        with np.load(args.data / folder / "test.npz", allow_pickle=False) as z:
            np.save(args.out / f"{name}.npy", padded_rgb(z["images"][:args.count]))
    for kind in ("constant", "noise"):
        np.save(args.out / f"{kind}.npy", synthetic(kind, args.count, rng))
    print(f"wrote mnist32, fashion32, constant and noise .npy ({args.count} images each) to {args.out}")


if __name__ == "__main__":
    main()
