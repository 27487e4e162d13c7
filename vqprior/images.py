"""Images on disk: uint8 batches to image grids, one file per image, and animations, written atomically in the
format their suffix names (.png, .jpg, .webp, .gif, ... as PIL knows them); image files back to uint8 tensors."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from vqprior.errors import InputError, UserError
from vqprior.io import atomic_write, current_umask


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 (B, C, H, W) with C in {1, 3} -> one uint8 (3, H', W') grid, ``nrow`` images per row."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise InputError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
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


def image_format(path: str | os.PathLike, animated: bool = False) -> str:
    """The PIL format ``path``'s suffix names (``.jpg`` -> JPEG), one that PIL can write (with several frames when
    ``animated``); a one-line UserError otherwise. Call it before the work so a bad name fails first."""
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    usable = Image.SAVE_ALL if animated else Image.SAVE
    if fmt is None or fmt not in usable:
        what = f"the suffix {suffix!r}" if suffix else "a name without a suffix"
        kinds = ".gif, .png or .webp" if animated else ".png, .jpg, .webp, .bmp, .tif, ..."
        raise UserError(f"cannot write {'an animation' if animated else 'an image'} to {path}: PIL knows no "
                        f"{'animated ' if animated else ''}format for {what}; use {kinds}")
    return fmt


def _save(image, tmp: str, fmt: str, **options) -> None:
    if fmt in ("JPEG", "WEBP") and not options.get("save_all"):
        options.setdefault("quality", 95)  # sample grids: keep the pixels readable, not the smallest file
    if fmt == "WEBP" and options.get("save_all"):
        options.setdefault("lossless", True)
    image.save(tmp, format=fmt, **options)


def save_image(grid: torch.Tensor, path: str | os.PathLike, scale: int = 1) -> None:
    """Atomically write a uint8 (3, H, W) image in the format of ``path``'s suffix (see ``image_format``)."""
    fmt = image_format(path)
    image = _to_pil(grid, scale)
    atomic_write(path, lambda tmp: _save(image, tmp, fmt))


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> None:
    """Atomically write uint8 (B, C, H, W) images as one image grid (format from the suffix)."""
    save_image(make_grid(images, nrow), path, scale)


def image_names(count: int) -> list[str]:
    """The file names ``save_image_folder`` gives ``count`` images: 0000.png, 0001.png, ..."""
    width = max(4, len(str(count - 1)))
    return [f"{i:0{width}d}.png" for i in range(count)]


def check_image_folder(folder: str | os.PathLike, overwrite: bool) -> None:
    """Fail before any work when ``folder`` cannot take new images: a file is there, or it holds files already
    and ``overwrite`` is off."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out-dir must be a folder, but a file exists there: {folder}")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"--out-dir {folder} is not empty; pass --overwrite to write into it")
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"output folder is not writable: {ancestor}")


def save_image_folder(images: torch.Tensor, folder: str | os.PathLike, scale: int = 1,
                      overwrite: bool = False) -> list[Path]:
    """Write uint8 (B, C, H, W) images as one PNG each (``image_names``) into ``folder``, created with its parents.

    A new or empty folder appears complete or not at all (the files are written into a temp folder beside it, which
    is then renamed into place); with ``overwrite`` an existing folder gets each file atomically, replacing files of
    the same name and keeping others."""
    import shutil
    import tempfile

    check_image_folder(folder, overwrite)
    folder = Path(folder)
    names = image_names(images.shape[0])
    pictures = [_to_pil(make_grid(images[i:i + 1], padding=0), scale) for i in range(images.shape[0])]
    if folder.is_dir() and any(folder.iterdir()):
        for name, picture in zip(names, pictures):
            atomic_write(folder / name, lambda tmp, p=picture: _save(p, tmp, "PNG"))
        return [folder / n for n in names]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; outputs should have the usual permissions
        for name, picture in zip(names, pictures):
            _save(picture, str(tmp / name), "PNG")
        os.replace(tmp, folder)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / n for n in names]


def save_animation(frames: list[torch.Tensor], path: str | os.PathLike, duration_ms: int = 40, scale: int = 1) -> None:
    """Atomically write uint8 (3, H, W) frames as a looping animation (GIF, or animated PNG / WebP by the suffix;
    the last frame held for a second)."""
    if not frames:
        raise InputError("no frames to write")
    fmt = image_format(path, animated=True)
    images = [_to_pil(f, scale) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [1000]

    def write(tmp):
        _save(images[0], tmp, fmt, save_all=True, append_images=images[1:], duration=durations, loop=0)

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
