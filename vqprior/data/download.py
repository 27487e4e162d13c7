"""Download a named dataset through torchvision's own dataset classes, once, into the project's npz layout.

torchvision fetches the archive, checks its md5 and unpacks it into ``data_dir`` (``cifar-10-batches-py/``,
``MNIST/raw/``, ...); each split is then read once through the same class and written beside it as
``train.npz`` / ``test.npz`` (``images`` uint8, ``labels``), the layout every later run reads, with no torchvision
file parsed again. Each npz is written atomically, so an interrupted download or conversion is simply done again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vqprior.errors import UserError
from vqprior.io import atomic_write

# Named dataset -> torchvision class name (looked up when used: torchvision imports slowly).
TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_CLASSES[name])


def download_as_npz(name: str, root: Path) -> None:
    """Download ``name`` into ``root`` (created if missing) and write ``root/train.npz`` and ``root/test.npz``.
    Network and checksum failures are one-line UserErrors; splits already converted are kept."""
    root.mkdir(parents=True, exist_ok=True)
    cls = torchvision_class(name)
    for split in ("train", "test"):
        out = root / f"{split}.npz"
        if out.is_file():
            continue
        try:
            source = cls(str(root), train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError, ...
            raise UserError(f"could not download {name} into {root}: {' '.join(str(e).split()) or type(e).__name__}"
                            ) from None
        images = np.ascontiguousarray(np.asarray(source.data, dtype=np.uint8))
        labels = np.asarray(source.targets, dtype=np.uint8)

        def write(tmp: str, images=images, labels=labels) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temp name
                np.savez_compressed(f, images=images, labels=labels)

        atomic_write(out, write)
