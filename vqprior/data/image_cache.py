"""LMDB image cache: decoded uint8 images written once, so later runs and epochs skip decoding.

One cache folder holds one LMDB environment per (dataset, split, image size[, source folder][, limit]), named
``<dataset>-<split>-<size>[-<dir hash>][-first<N>].lmdb``. Inside an environment (no pickle anywhere):

    b"__meta__"      JSON: format_version, dataset, split, image_size, limit, data_dir, count, shape [C, H, W],
                     num_classes, images_per_record
    b"%010d" % r     record r: a fixed header (uint32 n, little-endian), n int64 labels, then n images of C*H*W
                     raw uint8 bytes each (images r*K .. r*K+n-1, K = images_per_record)
    b"__complete__"  written last, in its own transaction: a cache without it is unfinished and gets rebuilt

Several images share a record because LMDB stores a value larger than half a page on whole overflow pages:
one 32x32x3 image per record would waste a quarter of the file.
The environment opens lazily, read-only, once per process (DataLoader workers, spawned or forked); never pickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np

from ..errors import UserError
from .datasets import ImageDataset

FORMAT_VERSION = 1
IMAGES_PER_RECORD = 64
RECORDS_PER_COMMIT = 16  # 1024 images per write transaction
META_KEY, COMPLETE_KEY = b"__meta__", b"__complete__"
_HEADER = struct.Struct("<I")
log = logging.getLogger(__name__)


def cache_name(name: str, split: str, image_size: int, data_dir=None, limit: int = 0) -> str:
    """The environment's folder name; the absolute data dir is hashed in so two folders never share a cache."""
    parts = [name, split, f"{image_size}px" if image_size else "native"]
    if name != "sample" and data_dir:
        parts.append(hashlib.sha256(str(Path(data_dir).expanduser().absolute()).encode()).hexdigest()[:8])
    if limit:
        parts.append(f"first{limit}")
    return "-".join(parts) + ".lmdb"


def _record_key(record: int) -> bytes:
    return b"%010d" % record


# LMDB refuses to open one environment twice in a process, so every reader in a process shares one read-only
# handle per path. Keyed by pid too: a handle inherited through fork must not be used in the child, and must be
# closed there before the path can be opened again (closing the child's copy leaves the parent's intact).
_READERS: dict[str, tuple[int, lmdb.Environment]] = {}
_READERS_LOCK = threading.Lock()


def _open_reader(path) -> lmdb.Environment:
    key = os.path.abspath(path)
    with _READERS_LOCK:
        entry = _READERS.get(key)
        if entry is None or entry[0] != os.getpid():
            if entry is not None:
                entry[1].close()
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False)
            _READERS[key] = entry = (os.getpid(), env)
        return entry[1]


def _close_reader(path) -> None:
    with _READERS_LOCK:
        entry = _READERS.pop(os.path.abspath(path), None)
    if entry is not None:
        entry[1].close()


def read_cache_metadata(path) -> dict | None:
    """The metadata of a complete cache of the current format, else None (missing, unfinished or outdated)."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return None
    try:
        with _open_reader(path).begin() as txn:
            meta, complete = txn.get(META_KEY), txn.get(COMPLETE_KEY)
    except lmdb.Error:
        return None
    if meta is None or complete is None:
        return None
    meta = json.loads(meta)
    return meta if meta.get("format_version") == FORMAT_VERSION else None


class CachedImageDataset(ImageDataset):
    """An ``ImageDataset`` read from a complete LMDB image cache; ``limit`` > 0 keeps the first items."""

    def __init__(self, path, limit: int = 0):
        meta = read_cache_metadata(path)
        if meta is None:
            raise UserError(f"not a complete vqprior image cache (format {FORMAT_VERSION}): {path}")
        count = meta["count"]
        c, h, w = meta["shape"]
        super().__init__(meta["dataset"], meta["split"], min(limit, count) if limit else count, c, h, w,
                         meta["num_classes"])
        # Only the path is stored: the LMDB handle opens on first read in each process (it cannot be pickled).
        self.path, self.meta, self.image_size = str(path), meta, meta["image_size"]

    def read_array(self, index):
        record, position = divmod(index, self.meta["images_per_record"])
        image_bytes = self.channels * self.height * self.width
        with _open_reader(self.path).begin(buffers=True) as txn:
            value = txn.get(_record_key(record))
            if value is None:
                raise UserError(f"image cache {self.path} is missing record {record}; delete it to rebuild")
            (n,) = _HEADER.unpack_from(value)
            label = int(np.frombuffer(value, np.int64, 1, _HEADER.size + 8 * position)[0])
            start = _HEADER.size + 8 * n + position * image_bytes
            array = np.frombuffer(value, np.uint8, image_bytes, start).reshape(self.channels, self.height,
                                                                               self.width).copy()
        return array, label

    def close(self) -> None:
        """Close this process's handle on the cache (every dataset on the same path shares it)."""
        _close_reader(self.path)


def _pack_record(items: list[tuple[np.ndarray, int]]) -> bytes:
    labels = np.array([label for _, label in items], dtype="<i8")
    return b"".join([_HEADER.pack(len(items)), labels.tobytes()] + [a.tobytes() for a, _ in items])


def write_image_cache(dataset: ImageDataset, path, metadata: dict | None = None, progress: bool | None = None,
                      workers: int = 0, map_size: int = 0) -> None:
    """Decode every item of ``dataset`` into a new LMDB cache at ``path`` (replacing whatever is there).

    ``workers`` decoding threads (0: up to 4; PIL releases the GIL while decoding), commits every
    ``RECORDS_PER_COMMIT`` records, grows the map when full, writes the complete marker last.
    """
    path = Path(path)
    _close_reader(path)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    c, h, w, n = dataset.channels, dataset.height, dataset.width, len(dataset)
    record_bytes = _HEADER.size + IMAGES_PER_RECORD * (8 + c * h * w)
    # Each record fills whole pages, plus B-tree pages: a 10 % margin on top is ample; growth covers the rest.
    map_size = map_size or int(1.1 * (n // IMAGES_PER_RECORD + 1) * (record_bytes + 4096)) + (1 << 20)
    meta = {"format_version": FORMAT_VERSION, "dataset": dataset.name, "split": dataset.split,
            "image_size": dataset.image_size, "count": n, "shape": [c, h, w],
            "num_classes": dataset.num_classes, "images_per_record": IMAGES_PER_RECORD, **(metadata or {})}
    progress = sys.stderr.isatty() if progress is None else progress
    env = lmdb.open(str(path), map_size=map_size, readahead=False, meminit=False, metasync=False, sync=False)
    try:
        _put_with_growth(env, [(META_KEY, json.dumps(meta).encode())])
        from tqdm import tqdm

        chunk = IMAGES_PER_RECORD * RECORDS_PER_COMMIT
        with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool, \
                tqdm(total=n, desc=f"caching {path.name}", unit="img", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, n, chunk):
                items = list(pool.map(_checked_reader(dataset, (c, h, w)), range(start, min(start + chunk, n))))
                puts = [(_record_key((start + i) // IMAGES_PER_RECORD), _pack_record(items[i:i + IMAGES_PER_RECORD]))
                        for i in range(0, len(items), IMAGES_PER_RECORD)]
                _put_with_growth(env, puts)
                bar.update(len(items))
        env.sync(True)
        _put_with_growth(env, [(COMPLETE_KEY, b"1")])  # last, and alone: its presence means every record is in
        env.sync(True)
    finally:
        env.close()
    log.info("cached %d images of %s/%s in %s", n, dataset.name, dataset.split, path)


def _checked_reader(dataset: ImageDataset, shape: tuple[int, int, int]) -> Callable[[int], tuple[np.ndarray, int]]:
    def read(index: int) -> tuple[np.ndarray, int]:
        array, label = dataset.read_array(index)
        if array.dtype != np.uint8 or array.shape != shape:
            raise UserError(f"{dataset.name} item {index} is {array.dtype} {array.shape}, expected uint8 {shape}")
        return np.ascontiguousarray(array), label
    return read


def _put_with_growth(env: lmdb.Environment, puts: list[tuple[bytes, bytes]]) -> None:
    """Write ``puts`` in one transaction, doubling the map size whenever it is full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in puts:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise cache building across processes (e.g. DDP ranks) with one hidden advisory lock file per folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(cache_dir / ".vqprior-cache.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cached_dataset(cache_dir, name: str, split: str, data_dir, image_size: int, limit: int,
                        load_source: Callable[[], ImageDataset], progress: bool | None = None) -> CachedImageDataset:
    """Return the cached dataset, building the cache from ``load_source()`` first unless a complete one exists.

    A complete cache of the whole split also serves a request with ``limit``; otherwise a limited request caches
    only its first ``limit`` items (so a quick run never decodes a whole large dataset).
    """
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache must be a folder, got a file: {cache_dir}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    full = cache_dir / cache_name(name, split, image_size, data_dir)
    path = cache_dir / cache_name(name, split, image_size, data_dir, limit)
    with _build_lock(cache_dir):
        for candidate in dict.fromkeys([full, path]):
            meta = read_cache_metadata(candidate)
            if meta and (meta["dataset"], meta["split"], meta["image_size"]) == (name, split, image_size):
                return CachedImageDataset(candidate, limit)
        if path.exists():
            log.warning("rebuilding unfinished or outdated image cache %s", path)
        source = load_source()
        write_image_cache(source, path, {"data_dir": str(Path(data_dir).expanduser().absolute()) if data_dir else "", "limit": limit}, progress=progress)
    return CachedImageDataset(path, limit)
