"""LMDB image cache: images written once, so later runs and epochs skip decoding the source files.

One cache folder holds one LMDB environment per (dataset, split, image size[, source folder][, limit][, encoding]),
named ``<dataset>-<split>-<size>[-<dir hash>][-first<N>][-png|-jpeg<Q>].lmdb``. Inside an environment (no pickle):

    b"__meta__"      JSON: format_version, dataset, split, image_size, limit, data_dir, count, shape [C, H, W],
                     num_classes, images_per_record, encoding ("raw" | "png" | "jpeg"), jpeg_quality (jpeg only)
    b"%010d" % r     record r: a header (uint32 n, little-endian), n int64 labels, then the n images
                     r*K .. r*K+n-1 (K = images_per_record): raw -- n times C*H*W uint8 bytes (C, H, W order);
                     png / jpeg -- n uint32 byte lengths, then the n encoded files back to back
    b"__complete__"  written last, in its own transaction: a cache without it is unfinished

Format 2 added ``encoding``; format 1 caches (raw records, no ``encoding``) are still read. PNG is lossless (about
half of raw for photographs at 256x256); JPEG is lossy at the quality the user chooses and several times smaller.
Encoded images are decoded when an item is read, i.e. in the DataLoader workers (``--workers``), not in the
training process.

Records go in by chunks of ``RECORDS_PER_COMMIT``, in order, each chunk one transaction. An interrupted build
therefore leaves whole records 0..k-1: building again with the same metadata resumes at record k (only the
remaining images are read and encoded); different metadata rebuilds from scratch.

Several images share a record because LMDB stores a value larger than half a page on whole overflow pages:
one 32x32x3 image per record would waste a quarter of the file.
The environment opens lazily, read-only, once per process (DataLoader workers, spawned or forked); never pickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np

from vqprior.data.datasets import ImageDataset
from vqprior.data.lmdb_store import begin_read, close_reader
from vqprior.errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: raw records, no "encoding" field
ENCODINGS = ("raw", "png", "jpeg")
IMAGES_PER_RECORD = 64
RECORDS_PER_COMMIT = 16  # 1024 images per write transaction
META_KEY, COMPLETE_KEY = b"__meta__", b"__complete__"
_HEADER = struct.Struct("<I")
log = logging.getLogger(__name__)


def check_encoding(encoding: str, jpeg_quality: int = 90) -> None:
    if encoding not in ENCODINGS:
        raise UserError(f"unknown image cache encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise UserError(f"JPEG quality must be in [1, 100], got {jpeg_quality}")


def encoding_suffix(encoding: str = "raw", jpeg_quality: int = 90) -> str:
    """"" for raw, "-png", "-jpeg90": the part of an environment's name (and of ``info``) naming its encoding."""
    return "" if encoding == "raw" else "-png" if encoding == "png" else f"-jpeg{int(jpeg_quality)}"


def encoding_of(meta: dict) -> str:
    """"raw", "png" or "jpeg (quality Q)" for a cache's metadata (format 1 caches are raw)."""
    encoding = meta.get("encoding", "raw")
    return f"jpeg (quality {meta['jpeg_quality']})" if encoding == "jpeg" else encoding


def cache_name(name: str, split: str, image_size: int, data_dir=None, limit: int = 0, encoding: str = "raw",
               jpeg_quality: int = 90) -> str:
    """The environment's folder name; the absolute data dir is hashed in so two folders never share a cache."""
    parts = [name, split, f"{image_size}px" if image_size else "native"]
    if name != "sample" and data_dir:
        parts.append(hashlib.sha256(str(Path(data_dir).expanduser().absolute()).encode()).hexdigest()[:8])
    if limit:
        parts.append(f"first{limit}")
    return "-".join(parts) + encoding_suffix(encoding, jpeg_quality) + ".lmdb"


def _record_key(record: int) -> bytes:
    return b"%010d" % record


def read_cache_state(path) -> tuple[dict | None, bool]:
    """(metadata or None, complete?) of the environment at ``path``; (None, False) when missing or foreign."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return None, False
    try:
        with begin_read(path) as txn:
            meta, complete = txn.get(META_KEY), txn.get(COMPLETE_KEY)
    except lmdb.Error:
        return None, False
    try:
        meta = json.loads(meta) if meta is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, False
    if not isinstance(meta, dict) or "images_per_record" not in meta:
        return None, False
    return meta, complete is not None


def read_cache_metadata(path) -> dict | None:
    """The metadata of a complete cache of a readable format, else None (missing, unfinished or outdated)."""
    meta, complete = read_cache_state(path)
    if meta is None or not complete:
        return None
    return meta if meta.get("format_version") in READABLE_VERSIONS else None


def count_written(path, meta: dict) -> int:
    """Images in the records 0..k-1 present in the environment (all of them once complete)."""
    with begin_read(path) as txn:
        records = txn.stat()["entries"] - 1 - (txn.get(COMPLETE_KEY) is not None)  # minus meta and marker
    return min(int(meta["count"]), max(0, records) * int(meta["images_per_record"]))


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
        with begin_read(self.path, buffers=True) as txn:
            value = txn.get(_record_key(record))
            if value is None:
                raise UserError(f"image cache {self.path} is missing record {record}; delete it to rebuild")
            (n,) = _HEADER.unpack_from(value)
            label = int(np.frombuffer(value, np.int64, 1, _HEADER.size + 8 * position)[0])
            shape = (self.channels, self.height, self.width)
            if self.meta.get("encoding", "raw") == "raw":
                size = int(np.prod(shape))
                start = _HEADER.size + 8 * n + position * size
                return np.frombuffer(value, np.uint8, size, start).reshape(shape).copy(), label
            lengths = np.frombuffer(value, "<u4", n, _HEADER.size + 8 * n).astype(np.int64)
            start = _HEADER.size + 12 * n + int(lengths[:position].sum())
            data = bytes(value[start:start + int(lengths[position])])
        return decode_image(data, shape), label

    def close(self) -> None:
        """Close this process's handle on the cache (every dataset on the same path shares it)."""
        close_reader(self.path)


def encode_image(array: np.ndarray, encoding: str, jpeg_quality: int = 90) -> bytes:
    """uint8 (C, H, W) -> PNG or JPEG file bytes (grayscale for C = 1)."""
    from PIL import Image

    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    out = io.BytesIO()
    if encoding == "png":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="JPEG", quality=int(jpeg_quality))
    return out.getvalue()


def decode_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """PNG / JPEG file bytes -> uint8 (C, H, W); UserError if they do not hold an image of ``shape``."""
    from PIL import Image

    c, h, w = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("L" if c == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"image cache: an encoded image does not decode ({str(e).splitlines()[0][:120]})") from None
    array = array[None] if c == 1 else array.transpose(2, 0, 1)
    if array.shape != (c, h, w):
        raise UserError(f"image cache: an encoded image is {array.shape}, expected {(c, h, w)}")
    return np.ascontiguousarray(array)


def _pack_record(items: list[tuple[bytes, int]], encoded: bool) -> bytes:
    """One record from (image bytes: raw or an encoded file, label) pairs."""
    labels = np.array([label for _, label in items], dtype="<i8")
    lengths = np.array([len(data) for data, _ in items], dtype="<u4").tobytes() if encoded else b""
    return b"".join([_HEADER.pack(len(items)), labels.tobytes(), lengths] + [data for data, _ in items])


def write_image_cache(dataset: ImageDataset, path, metadata: dict | None = None, progress: bool | None = None,
                      workers: int = 0, map_size: int = 0, encoding: str = "raw", jpeg_quality: int = 90) -> None:
    """Write every item of ``dataset`` into an LMDB cache at ``path``, stored as ``encoding`` (raw, png, jpeg).

    An unfinished cache at ``path`` with the same metadata is resumed at its first missing record; anything else
    there is replaced. ``workers`` reading/encoding threads (0: up to 4; PIL releases the GIL while decoding and
    encoding), commits every ``RECORDS_PER_COMMIT`` records, grows the map when full, writes the complete marker last.
    """
    check_encoding(encoding, jpeg_quality)
    path = Path(path)
    c, h, w, n = dataset.channels, dataset.height, dataset.width, len(dataset)
    meta = {"format_version": FORMAT_VERSION, "dataset": dataset.name, "split": dataset.split,
            "image_size": dataset.image_size, "count": n, "shape": [c, h, w],
            "num_classes": dataset.num_classes, "images_per_record": IMAGES_PER_RECORD, "encoding": encoding,
            **({"jpeg_quality": int(jpeg_quality)} if encoding == "jpeg" else {}), **(metadata or {})}
    first = _resume_point(path, meta)
    close_reader(path)
    if first == 0 and path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    record_bytes = _HEADER.size + IMAGES_PER_RECORD * (12 + c * h * w)
    # Each record fills whole pages, plus B-tree pages: a 10 % margin on top is ample; growth covers the rest
    # (and a raw-sized map is an upper bound for PNG / JPEG records but for noise).
    map_size = map_size or int(1.1 * (n // IMAGES_PER_RECORD + 1) * (record_bytes + 4096)) + (1 << 20)
    progress = sys.stderr.isatty() if progress is None else progress
    env = lmdb.open(str(path), map_size=map_size, readahead=False, meminit=False, metasync=False, sync=False)
    try:
        if first == 0:
            _put_with_growth(env, [(META_KEY, json.dumps(meta).encode())])
        else:
            log.info("resuming image cache %s at image %d of %d", path, first, n)
        from tqdm import tqdm

        read = _checked_reader(dataset, (c, h, w), encoding, jpeg_quality)
        chunk = IMAGES_PER_RECORD * RECORDS_PER_COMMIT
        with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool, \
                tqdm(total=n, initial=first, desc=f"caching {path.name}", unit="img", file=sys.stderr,
                     disable=not progress) as bar:
            for start in range(first, n, chunk):
                items = list(pool.map(read, range(start, min(start + chunk, n))))
                puts = [(_record_key((start + i) // IMAGES_PER_RECORD),
                         _pack_record(items[i:i + IMAGES_PER_RECORD], encoding != "raw"))
                        for i in range(0, len(items), IMAGES_PER_RECORD)]
                _put_with_growth(env, puts)
                bar.update(len(items))
        env.sync(True)
        _put_with_growth(env, [(COMPLETE_KEY, b"1")])  # last, and alone: its presence means every record is in
        env.sync(True)
    finally:
        env.close()
    log.info("cached %d images of %s/%s in %s", n, dataset.name, dataset.split, path)


def _resume_point(path: Path, meta: dict) -> int:
    """The first image to write: where an unfinished build of the same metadata stopped, else 0."""
    old, complete = read_cache_state(path)
    if old is None or complete or old != json.loads(json.dumps(meta)):
        return 0
    return count_written(path, old)


def _checked_reader(dataset: ImageDataset, shape: tuple[int, int, int], encoding: str,
                    jpeg_quality: int) -> Callable[[int], tuple[bytes, int]]:
    def read(index: int) -> tuple[bytes, int]:
        array, label = dataset.read_array(index)
        if array.dtype != np.uint8 or array.shape != shape:
            raise UserError(f"{dataset.name} item {index} is {array.dtype} {array.shape}, expected uint8 {shape}")
        array = np.ascontiguousarray(array)
        return (array.tobytes() if encoding == "raw" else encode_image(array, encoding, jpeg_quality)), label
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
                        load_source: Callable[[], ImageDataset], progress: bool | None = None,
                        encoding: str = "raw", jpeg_quality: int = 90) -> CachedImageDataset:
    """Return the cached dataset, building the cache from ``load_source()`` first unless a complete one exists
    (resuming an interrupted build of the same request).

    A complete cache of the whole split (same encoding) also serves a request with ``limit``; otherwise a limited
    request caches only its first ``limit`` items (so a quick run never decodes a whole large dataset).
    """
    check_encoding(encoding, jpeg_quality)
    cache_dir = Path(cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache must be a folder, got a file: {cache_dir}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    full = cache_dir / cache_name(name, split, image_size, data_dir, 0, encoding, jpeg_quality)
    path = cache_dir / cache_name(name, split, image_size, data_dir, limit, encoding, jpeg_quality)
    with _build_lock(cache_dir):
        for candidate in dict.fromkeys([full, path]):
            meta = read_cache_metadata(candidate)
            if meta and (meta["dataset"], meta["split"], meta["image_size"]) == (name, split, image_size):
                return CachedImageDataset(candidate, limit)
        if path.exists():
            log.warning("completing unfinished (or rebuilding outdated) image cache %s", path)
        source = load_source()
        data = str(Path(data_dir).expanduser().absolute()) if data_dir else ""
        write_image_cache(source, path, {"data_dir": data, "limit": limit}, progress=progress, encoding=encoding,
                          jpeg_quality=jpeg_quality)
    return CachedImageDataset(path, limit)
