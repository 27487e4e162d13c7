"""The bundled sample's pixel format: many same-sized images tiled into one lossless PNG mosaic, row-major.

PNG packs CIFAR-sized tiles about a quarter tighter than deflate over raw bytes and needs only numpy and Pillow to
read, with no pickle. ``scripts/make_sample.py`` writes the sample; ``datasets`` reads it.
"""
from __future__ import annotations

import io
import math

import numpy as np

MOSAIC_COLUMNS = 50  # images per mosaic row; any value works, this one keeps the PNG near-square


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
