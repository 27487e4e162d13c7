"""Images on disk: uint8 batches to PNG grids and animated GIFs, written atomically; PNG files to uint8 tensors."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .errors import UserError


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 (B, C, H, W) with C in {1, 3} -> one uint8 (3, H', W') grid, ``nrow`` images per row."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    images = images.cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    B, C, H, W = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    grid = torch.full((C, rows * (H + padding) + padding, nrow * (W + padding) + padding), pad_value,
                      dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, y:y + H, x:x + W] = images[i]
    return grid


def _to_pil(grid: torch.Tensor, scale: int = 1):
    from PIL import Image

    array = grid.permute(1, 2, 0).numpy() if grid.dim() == 3 else grid.numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def save_png(grid: torch.Tensor, path: str | os.PathLike, scale: int = 1) -> None:
    """Atomically write a uint8 (3, H, W) image as PNG."""
    image = _to_pil(grid, scale)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> None:
    """Atomically write uint8 (B, C, H, W) images as one PNG grid."""
    save_png(make_grid(images, nrow), path, scale)


def save_gif(frames: list[torch.Tensor], path: str | os.PathLike, duration_ms: int = 40, scale: int = 1) -> None:
    """Atomically write uint8 (3, H, W) frames as a looping animated GIF (the last frame held for a second)."""
    if not frames:
        raise ValueError("no frames to write")
    images = [_to_pil(f, scale) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [1000]

    def write(tmp):
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)

    atomic_write(path, write)


def load_image(path: str | os.PathLike, channels: int = 3, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as uint8 (C, H, W), converted to ``channels`` (1 or 3); optionally resized / centre-cropped
    to ``size`` = (H, W). Errors are one-line UserErrors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = _normalise_mode(im, channels)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"not a readable image: {path} ({type(e).__name__})") from None
    if size is not None and (image.height, image.width) != tuple(size):
        image = resize_center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _normalise_mode(im, channels: int):
    """Any PIL mode (RGBA, P, 16-bit I;16, I, F, L, ...) -> 8-bit L or RGB."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        im = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))  # composite transparency onto white
        im = Image.alpha_composite(canvas, im)
    return im.convert("RGB" if channels == 3 else "L")


def resize_center_crop(image, size: tuple[int, int]):
    """Resize the shorter side to fit ``size`` = (H, W) (bicubic), then centre-crop."""
    from PIL import Image

    H, W = size
    scale = max(H / image.height, W / image.width)
    new = (max(W, round(image.width * scale)), max(H, round(image.height * scale)))
    image = image.resize(new, Image.BICUBIC)
    left, top = (image.width - W) // 2, (image.height - H) // 2
    return image.crop((left, top, left + W, top + H))
