"""Image files for lossless coding: PNG files, folders of PNGs and uint8 (N, C, H, W) .npy arrays, read strictly
(no conversion that would change a pixel) and written atomically (a folder is filled under a temp name, then
renamed into place)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from vqprior.errors import UserError
from vqprior.io import atomic_write

_MODES = {"L": 1, "RGB": 3}


def is_png(path) -> bool:
    return Path(path).suffix.lower() == ".png"


def png_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_png(p))
    if not files:
        raise UserError(f"no .png files in {folder}")
    return files


def read_png(path: Path, channels: int) -> torch.Tensor:
    """One 8-bit grayscale (L) or RGB PNG as uint8 (C, H, W); anything a lossless coder of C channels cannot take
    exactly (another channel count, alpha, a palette, 16 bits) is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode = im.format, im.mode
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"not a readable image: {path} ({type(e).__name__})") from None
    if fmt != "PNG":
        raise UserError(f"not a PNG file: {path} ({fmt})")
    if _MODES.get(mode) != channels:
        want = "8-bit RGB" if channels == 3 else "8-bit grayscale (L)"
        raise UserError(f"{path} is a {mode} PNG; this model codes {want} images losslessly")
    array = array.reshape(array.shape[0], array.shape[1], -1)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_images(path, channels: int) -> tuple[torch.Tensor, list[str] | None]:
    """uint8 (N, C, H, W) from a PNG, a folder of PNGs (sorted by name; the names are returned) or a .npy."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        files = png_files(path)
        images = [read_png(f, channels) for f in files]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise UserError(f"the PNGs in {path} differ in size ({', '.join(map(str, sorted(shapes)[:3]))}); "
                            f"one file codes images of one size")
        return torch.stack(images), [f.name for f in files]
    if is_png(path):
        return read_png(path, channels).unsqueeze(0), None
    if path.suffix.lower() == ".npy":
        return as_images(load_npy(path), channels, str(path)), None
    raise UserError(f"input must be a .png, a folder of PNGs or a .npy array: {path}")


def load_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise UserError(f"not a .npy file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"not a readable .npy array: {path} ({str(e).splitlines()[0][:100]})") from None


def as_images(array: np.ndarray, channels: int, where: str) -> torch.Tensor:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != channels or 0 in array.shape:
        raise UserError(f"{where}: expected a uint8 (N, {channels}, H, W) array, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _png(image: torch.Tensor):
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array),
                           "L" if array.shape[2] == 1 else "RGB")


def check_image_output(path) -> None:
    """Refuse an output before any work: a missing parent folder, or a folder that exists and is not empty."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder is not writable: {parent}")
    if path.suffix.lower() in (".png", ".npy", ".npz"):
        if path.is_dir():
            raise UserError(f"output path is a folder: {path}")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"output {path} exists and is not an empty folder")


def write_images(path, images: torch.Tensor, names: list[str] | None = None) -> str:
    """Write uint8 (N, C, H, W) as a .npy, one .png (N = 1), or a folder of PNGs (``names``, else 000000.png ...).
    Returns what was written, for the command's message."""
    path = Path(path)
    images = images.cpu()
    suffix = path.suffix.lower()
    if suffix == ".npy":
        def write_npy(tmp):
            with open(tmp, "wb") as f:
                np.save(f, images.numpy(), allow_pickle=False)
        atomic_write(path, write_npy)
        return f"a {tuple(images.shape)} uint8 array"
    if suffix == ".png":
        if images.shape[0] != 1:
            raise UserError(f"{images.shape[0]} images do not fit one PNG: give a folder or a .npy as output")
        atomic_write(path, lambda tmp: _png(images[0]).save(tmp, format="PNG"))
        return "1 PNG"
    names = names or [f"{i:06d}.png" for i in range(images.shape[0])]
    if len(set(names)) != len(names) or any(Path(n).name != n or not is_png(n) for n in names):
        raise UserError("the file's image names are invalid (repeated, or not plain .png names)")
    parent = path.parent if str(path.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        for name, image in zip(names, images):
            _png(image).save(tmp / name, format="PNG")
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, path)  # an empty folder at ``path`` is replaced; anything else was refused up front
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{len(names)} PNGs"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
