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
