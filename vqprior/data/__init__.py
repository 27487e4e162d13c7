"""Data: image datasets (CIFAR-10, MNIST, downsampled ImageNet, image folders, the bundled sample) and LMDB caches.

``load_image_dataset`` is the entry point; see ``datasets`` for the sources, ``image_cache`` and ``codes`` for the two
LMDB caches. May import only the top-level modules (errors, io, images, levels); never models, sampling, training,
evaluation or compress.
"""
from vqprior.data.datasets import DATASETS, SPLITS, ImageDataset
from vqprior.data.image_cache import CachedImageDataset, write_image_cache
from vqprior.data.loader import load_image_dataset

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "load_image_dataset", "CachedImageDataset", "write_image_cache"]
