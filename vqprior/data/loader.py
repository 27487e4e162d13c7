"""``load_image_dataset``: a named dataset's split, read from its source or from an LMDB image cache."""
from __future__ import annotations

import os

from vqprior.data.datasets import DATASETS, SPLITS, ImageDataset, load_source
from vqprior.data.image_cache import load_cached_dataset
from vqprior.errors import UserError


def load_image_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, image_size: int = 0,
                       cache: str | os.PathLike | None = None, download: bool = False, limit: int = 0,
                       progress: bool | None = None, cache_encoding: str = "raw",
                       jpeg_quality: int = 90) -> ImageDataset:
    """Load dataset ``name`` (one of ``DATASETS``), split ``train`` or ``test``, as an ``ImageDataset``.

    ``image_size`` > 0 resizes to image_size x image_size; ``limit`` > 0 keeps the first ``limit`` items;
    ``cache`` = a folder of LMDB image caches, reused when complete (built, with a progress bar when ``progress``,
    default: stderr is a terminal, when not), storing images as ``cache_encoding`` (raw, png, jpeg at
    ``jpeg_quality``). ``data_dir`` is ignored for ``sample``.
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose train or test")
    image_size, limit = int(image_size or 0), int(limit or 0)  # CLI options may arrive as None
    if image_size < 0 or limit < 0:
        raise UserError("image size and limit must be >= 0")
    if cache:
        return load_cached_dataset(cache, name, split, data_dir, image_size, limit,
                                   lambda: load_source(name, split, data_dir, image_size, download, limit),
                                   progress=progress, encoding=cache_encoding, jpeg_quality=jpeg_quality)
    return load_source(name, split, data_dir, image_size, download, limit)


def load_image_files(paths, channels: int) -> tuple[ImageDataset, list[str]]:
    """Images given as files, as an unlabelled in-memory ``ImageDataset`` and one name per item: each path an image
    file, a folder (its images, searched recursively, sorted; hidden entries skipped) or a ``.npy`` uint8 array
    (N, C, H, W) or (N, H, W) whose items are named ``file.npy:i``. Files are converted to ``channels`` (1 or 3);
    every image must have the size of the first."""
    from pathlib import Path

    import torch

    from vqprior.data.datasets import IMAGE_EXTENSIONS, ArrayImageDataset, _scan_images
    from vqprior.images import load_image

    images, names = [], []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UserError(f"image input not found: {path}")
        if path.suffix.lower() == ".npy" and path.is_file():
            array = _read_image_array(path, channels)
            images += list(torch.from_numpy(array))
            names += [f"{path}:{i}" for i in range(len(array))]
            continue
        files = [path / f for f in _scan_images(path)] if path.is_dir() else [path]
        if not files:
            raise UserError(f"no images in {path} (looked for {'/'.join(IMAGE_EXTENSIONS)}, in subfolders too)")
        images += [load_image(f, channels) for f in files]
        names += [str(f) for f in files]
    if not images:
        raise UserError("no images given")
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) > 1:
        raise UserError(f"the images differ in size ({', '.join('x'.join(map(str, s)) for s in shapes[:3])}); "
                        "scoring needs one size (the model's)")
    stacked = torch.stack(images).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C), as ArrayImageDataset holds them
    return ArrayImageDataset("files", "given", stacked, torch.zeros(len(images), dtype=torch.int64), 0), names


def _read_image_array(path, channels: int):
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a .npy array ({type(e).__name__})") from None
    if array.ndim == 3 and channels == 1:
        array = array[:, None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != channels:
        raise UserError(f"{path}: expected uint8 images (N, {channels}, H, W), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)
