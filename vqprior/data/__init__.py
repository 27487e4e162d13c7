"""Data: image datasets (CIFAR-10, MNIST, downsampled ImageNet, image folders, the bundled sample) and LMDB caches.

``load_image_dataset`` is the entry point; see ``datasets`` for the sources and ``image_cache`` for the cache format.
"""
from .datasets import DATASETS, SPLITS, ImageDataset, load_image_dataset
from .image_cache import CachedImageDataset, write_image_cache

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "load_image_dataset", "CachedImageDataset", "write_image_cache"]
