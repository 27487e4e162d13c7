"""Image datasets: every supported source loaded as an ``ImageDataset`` of uint8 images, labels and indices.

Items are ``{"image": uint8 (C, H, W), "label": int64 scalar, "index": int64 scalar}`` (``index`` is the position
in this dataset, so ``dataset[item["index"]]`` gives the item back); torch's default collate stacks them. Sources:

- ``sample``: the bundled CIFAR-10 subset (``sample/cifar10_sample.npz``, built by ``scripts/make_sample.py``).
- ``cifar10`` / ``mnist`` / ``fashion-mnist``: ``data_dir`` with ``train.npz`` / ``test.npz`` (``images`` uint8
  (N, H, W[, C]), ``labels``), also accepted one level down in ``data_dir/<name>/``, or torchvision's files
  (``cifar-10-batches-py/``, ``MNIST/raw/``, ``FashionMNIST/raw/``); ``download`` lets torchvision fetch them.
- ``imagenet32`` / ``imagenet64``: van den Oord et al.'s PNG folders ``train_32x32/`` and ``valid_32x32/``
  (unlabeled), or the classification variant's npz batches (``train_data_batch_N.npz``, ``val_data.npz``; ``data``
  (N, 3*S*S) CHW-flattened, 1-based ``labels``), directly in ``data_dir`` or one folder down. ``test`` is ``valid``.
- ``folder``: any folder of images (see ``_load_folder``).

``image_size`` > 0 resizes (shorter side, bicubic) and centre-crops every image to a square. ``cache`` stores the
decoded images in LMDB (``image_cache``) so later runs skip decoding.
"""
from __future__ import annotations

import operator
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vqprior.errors import UserError
from vqprior.images import load_image, resize_center_crop

DATASETS = ("cifar10", "mnist", "fashion-mnist", "imagenet32", "imagenet64", "folder", "sample")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "cifar10_sample.npz"
FOLDER_HOLDOUT_EVERY = 20  # without a test/ or val/ folder, every 20th file (5 %) is held out for testing
_TORCHVISION_LAYOUT = {"cifar10": "cifar-10-batches-py", "mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}


class ImageDataset(Dataset):
    """Base class: ``len`` items of uint8 ``(channels, height, width)`` images with int labels.

    Subclasses implement ``read_array(index) -> (uint8 (C, H, W) numpy array at the output size, label)``.
    ``num_classes`` is 0 for unlabeled data (every label is then 0).
    """

    def __init__(self, name: str, split: str, length: int, channels: int, height: int, width: int,
                 num_classes: int):
        self.name, self.split, self.length = name, split, int(length)
        self.channels, self.height, self.width, self.num_classes = channels, height, width, num_classes
        self.image_size = 0  # the requested square size, 0 when images keep their native size

    def __len__(self) -> int:
        return self.length

    def read_array(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        array, label = self.read_array(index)
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, order="C")  # views of memory-mapped or read-only arrays: torch wants its own
        return {"image": torch.from_numpy(array),
                "label": torch.tensor(label, dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}/{self.split}: {self.length} x "
                f"{self.channels}x{self.height}x{self.width}, {self.num_classes} classes)")


def resize_array(array: np.ndarray, size: int) -> np.ndarray:
    """uint8 (C, H, W) -> (C, size, size): shorter side resized with PIL bicubic, then centre-cropped."""
    from PIL import Image

    if array.shape[1:] == (size, size):
        return array
    image = Image.fromarray(array[0]) if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))
    out = np.asarray(resize_center_crop(image, (size, size)), dtype=np.uint8)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


class ArrayImageDataset(ImageDataset):
    """Images held in memory as a uint8 (N, H, W, C) tensor (tensors reach DataLoader workers by shared memory)."""

    def __init__(self, name: str, split: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 image_size: int = 0):
        n, h, w, c = images.shape
        super().__init__(name, split, n, c, image_size or h, image_size or w, num_classes)
        self.images, self.labels, self.image_size = images, labels.to(torch.int64), image_size

    def read_array(self, index):
        array = self.images[index].numpy().transpose(2, 0, 1)
        if self.image_size:
            array = resize_array(array, self.image_size)
        return array, int(self.labels[index])


class FileImageDataset(ImageDataset):
    """One image file per item, decoded on access (RGB; alpha composited, 16-bit scaled by ``load_image``)."""

    def __init__(self, name: str, split: str, root: Path, files: list[str], labels: list[int] | None,
                 num_classes: int, height: int, width: int, resize: bool):
        super().__init__(name, split, len(files), 3, height, width, num_classes)
        self.root, self.files, self.resize = str(root), files, resize
        self.image_size = height if resize else 0
        self.labels = torch.tensor(labels if labels is not None else [0] * len(files), dtype=torch.int64)

    def read_array(self, index):
        path = os.path.join(self.root, self.files[index])
        image = load_image(path, channels=3, size=(self.height, self.width) if self.resize else None)
        if tuple(image.shape[1:]) != (self.height, self.width):
            raise UserError(f"{path} is {image.shape[2]}x{image.shape[1]}, not {self.width}x{self.height}: "
                            "pass --image-size to resize every image")
        return image.numpy(), int(self.labels[index])


class NpzBatchImageDataset(ImageDataset):
    """Downsampled-ImageNet npz batches (``data`` (N, 3*S*S) CHW-flattened, 1-based ``labels``).

    Uncompressed npz members are memory-mapped, so random access is cheap; a compressed batch is decompressed
    whole on first use (one batch kept per process), which makes shuffled reads slow: use the LMDB cache then.
    Arrays are opened lazily per process, never pickled to DataLoader workers.
    """

    def __init__(self, name: str, split: str, paths: list[Path], labels: np.ndarray, counts: list[int],
                 native_size: int, image_size: int = 0):
        size = image_size or native_size
        super().__init__(name, split, len(labels), 3, size, size, 1000)
        self.paths, self.native_size, self.image_size = [str(p) for p in paths], native_size, image_size
        self.labels = torch.from_numpy(labels.astype(np.int64) - 1)  # stored 1-based
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._arrays: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}

    def _batch(self, b: int) -> np.ndarray:
        if b not in self._arrays:
            array = map_npz_member(self.paths[b], "data")
            if array is None:  # compressed: keep just one decompressed batch in memory
                self._arrays = {k: v for k, v in self._arrays.items() if isinstance(v, np.memmap)}
                with np.load(self.paths[b], allow_pickle=False) as z:
                    array = z["data"]
            self._arrays[b] = array
        return self._arrays[b]

    def read_array(self, index):
        b = int(np.searchsorted(self.offsets, index, side="right")) - 1
        s = self.native_size
        array = np.array(self._batch(b)[index - self.offsets[b]], dtype=np.uint8).reshape(3, s, s)
        if self.image_size:
            array = resize_array(array, self.image_size)
        return array, int(self.labels[index])


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def read_npz_shape(path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an npz, read from its header without loading the data."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        return _read_npy_header(f)[0]


def map_npz_member(path: str, key: str) -> np.ndarray | None:
    """Memory-map array ``key`` of an npz when it is stored uncompressed; None when it is deflated."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])  # zip local file header
        f.seek(info.header_offset + 30 + name_length + extra_length)
        shape, fortran_order, dtype = _read_npy_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise UserError(f"{path}: {key} holds Python objects; refusing to unpickle")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def _require_dir(name: str, data_dir, expected: str) -> Path:
    if not data_dir:
        raise UserError(f"{name} needs --data-dir: a folder with {expected}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data dir not found: {root} (expected {expected})")
    return root


def _read_npz_images(path: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` uint8 (N, H, W) or (N, H, W, C) and ``labels`` (N,) -> (N, H, W, C) uint8, (N,) int64."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: need arrays images and labels ({type(e).__name__})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != channels or len(labels) != len(images):
        raise UserError(f"{path}: expected uint8 images (N, H, W{', 3' if channels == 3 else ''}) and N labels, "
                        f"got {images.dtype} {images.shape} and {len(labels)} labels")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _load_cifar_or_mnist(name, split, data_dir, image_size, download) -> ImageDataset:
    channels = 3 if name == "cifar10" else 1
    layout = _TORCHVISION_LAYOUT[name]
    expected = f"train.npz / test.npz (arrays images, labels) or torchvision's {layout}/"
    if download and data_dir:
        Path(data_dir).expanduser().mkdir(parents=True, exist_ok=True)
    root = _require_dir(name, data_dir, expected + (" (with --download: the folder to download into)" if download
                                                    else ", or pass --download with a folder to download into"))
    candidates = (root / f"{split}.npz", root / name / f"{split}.npz")
    if download and not any(c.is_file() for c in candidates):
        from vqprior.data.download import download_as_npz

        download_as_npz(name, root)  # torchvision fetches and checks the archive; converted once to npz
    for candidate in candidates:
        if candidate.is_file():
            images, labels = _read_npz_images(candidate, channels)
            return ArrayImageDataset(name, split, images, labels, 10, image_size)
    if not (root / layout).is_dir():
        raise UserError(f"no {name} data in {root}: expected {expected}, or pass --download")
    try:
        from vqprior.data.download import torchvision_class

        source = torchvision_class(name)(str(root), train=split == "train", download=False)
    except Exception as e:  # torchvision raises RuntimeError, OSError, ... : one line for the user
        raise UserError(f"could not read {name} in {root}: {' '.join(str(e).split()) or type(e).__name__}") \
            from None
    images = torch.as_tensor(np.asarray(source.data, dtype=np.uint8))
    images = images[..., None] if images.dim() == 3 else images
    return ArrayImageDataset(name, split, images, torch.as_tensor(source.targets), 10, image_size)


def _load_sample(split, image_size) -> ImageDataset:
    from vqprior.data.mosaic import decode_mosaic_png

    with np.load(SAMPLE_PATH, allow_pickle=False) as z:
        labels = z[f"{split}_labels"]
        images = decode_mosaic_png(z[f"{split}_png"], len(labels), 32, 32)
    return ArrayImageDataset("sample", split, torch.from_numpy(images), torch.from_numpy(labels), 10, image_size)


def _find_npz_batches(root: Path, pattern: str) -> list[Path]:
    found = sorted(set(root.glob(pattern)) | set(root.glob(f"*/{pattern}")))
    # train_data_batch_10 sorts after _1 and before _2 as text: order by the batch number instead
    return sorted(found, key=lambda p: (len(p.stem), p.stem))


def _load_imagenet(name, split, data_dir, image_size) -> ImageDataset:
    s = 32 if name == "imagenet32" else 64
    folder = f"{'train' if split == 'train' else 'valid'}_{s}x{s}"
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    root = _require_dir(name, data_dir, f"the PNG folder {folder}/ or npz batches {pattern}")
    if (root / folder).is_dir():
        files = _scan_images(root / folder)
        if not files:
            raise UserError(f"no images in {root / folder}")
        return FileImageDataset(name, split, root / folder, files, None, 0, image_size or s, image_size or s,
                                resize=bool(image_size))
    paths = _find_npz_batches(root, pattern)
    if not paths:
        raise UserError(f"no {name} {split} data in {root}: expected the PNG folder {folder}/ or npz batches "
                        f"{pattern} (here or one folder down)")
    labels, counts = [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                labels.append(np.asarray(z["labels"]).reshape(-1))
            shape = read_npz_shape(path, "data")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"cannot read {path}: need arrays data and labels ({type(e).__name__})") from None
        if len(shape) != 2 or shape[1] != 3 * s * s or shape[0] != len(labels[-1]):
            raise UserError(f"{path}: data {shape} is not {len(labels[-1])} rows of {s}x{s} RGB; wrong --dataset?")
        if len(labels[-1]) and not 1 <= labels[-1].min() <= labels[-1].max() <= 1000:
            raise UserError(f"{path}: labels must be 1-based classes 1..1000")
        counts.append(len(labels[-1]))
    return NpzBatchImageDataset(name, split, paths, np.concatenate(labels), counts, s, image_size)


def _scan_images(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative paths (sorted, '/'-separated) of image files under ``root``; hidden entries and ``skip`` ignored."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (rel == "." and d in skip)]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(files)


def _common_size(root: Path, files: list[str]) -> tuple[int, int]:
    """(H, W) shared by every file (headers only); a UserError when sizes differ or a file is unreadable."""
    from PIL import Image

    first, size = None, None
    for f in files:
        try:
            with Image.open(root / f) as im:
                this = (im.height, im.width)
        except Exception as e:  # PIL raises several types for damaged files
            raise UserError(f"not a readable image: {root / f} ({type(e).__name__})") from None
        if size is None:
            first, size = f, this
        elif this != size:
            raise UserError(f"images differ in size ({first} is {size[1]}x{size[0]}, {f} is {this[1]}x{this[0]}): "
                            "pass --image-size")
    return size


def _load_folder(split, data_dir, image_size) -> ImageDataset:
    """Any image folder, searched recursively for png/jpg/jpeg/bmp/gif/webp files (hidden files skipped).

    Splits: ``train`` reads ``<dir>/train`` if it exists, else the whole folder (minus any ``test/`` / ``val/``);
    ``test`` reads ``<dir>/test`` or ``<dir>/val``. Without a test/val folder the split is a deterministic 5 %
    hold-out: in sorted path order, every 20th file (positions 0, 20, 40, ...) is test, the rest train.
    Labels: when every image of the split root sits inside a subfolder, the subfolder names (sorted, over train
    and test together) are the classes; otherwise the data is unlabeled (``num_classes`` 0).
    Images become RGB; ``image_size`` resizes and centre-crops, and is required unless all images share one size.
    """
    root = _require_dir("folder", data_dir, "images (png/jpg/jpeg/bmp/gif/webp)")
    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    train_root = root / "train" if (root / "train").is_dir() else root
    train_files = _scan_images(train_root, skip=("test", "val") if train_root == root else ())
    if held_out is None:
        holdout = [f for i, f in enumerate(train_files) if i % FOLDER_HOLDOUT_EVERY == 0]
        kept = [f for i, f in enumerate(train_files) if i % FOLDER_HOLDOUT_EVERY != 0]
        split_root, files, all_files = train_root, (kept if split == "train" else holdout), train_files
    else:
        test_files = _scan_images(held_out)
        split_root, files = (train_root, train_files) if split == "train" else (held_out, test_files)
        all_files = train_files + test_files
    if not files:
        _explain_empty(root if not all_files else split_root, split)
    labeled = all("/" in f for f in all_files)
    classes = sorted({f.split("/")[0] for f in all_files}) if labeled else []
    labels = [classes.index(f.split("/")[0]) for f in files] if labeled else None
    h, w = (image_size, image_size) if image_size else _common_size(split_root, files)
    return FileImageDataset("folder", split, split_root, files, labels, len(classes), h, w, resize=bool(image_size))


def _explain_empty(folder: Path, split: str) -> None:
    entries = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not entries:
        raise UserError(f"no images found: {folder} is empty")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
        raise UserError(f"no images found in {folder}: {len(entries)} file(s), none ending in "
                        f"{'/'.join(IMAGE_EXTENSIONS)}")
    raise UserError(f"too few images in {folder} to hold out a {split} split; add a test/ folder")


def load_source(name, split, data_dir, image_size, download, limit) -> ImageDataset:
    if name == "sample":
        dataset = _load_sample(split, image_size)
    elif name in _TORCHVISION_LAYOUT:
        dataset = _load_cifar_or_mnist(name, split, data_dir, image_size, download)
    elif name in ("imagenet32", "imagenet64"):
        dataset = _load_imagenet(name, split, data_dir, image_size)
    else:
        dataset = _load_folder(split, data_dir, image_size)
    if limit and limit < len(dataset):
        dataset.length = limit  # every ImageDataset reads items by position, so truncating is enough
    return dataset
