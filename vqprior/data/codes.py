"""The LMDB code cache: VQ-VAE codes of a dataset, extracted once (``extract_codes``) and read by prior training
(``CodeDataset``). This module owns the on-disk format, documented here so other tools can read it.

Format (version 1). An LMDB environment folder (``data.mdb`` + ``lock.mdb``), one unnamed database, no pickle:

- ``b"__meta__"``: UTF-8 JSON object::

      {"format": "vqprior-codes", "format_version": 1, "levels": N, "level_names": ["top", ..., "bottom"],
       "shapes": [[h, w], ...], "codebook_sizes": [K, ...], "dataset": str, "split": str, "vqvae_sha256": str,
       "count": N, "image_shape": [C, H, W], "num_classes": int, "record_header": "<qq", "code_dtype": "<u2",
       "vqvae_path": str}   (vqvae_path: where the VQ-VAE checkpoint was at extraction, a hint; the sha256 decides)

  ``shapes`` and ``codebook_sizes`` are per level, ordered like ``level_names`` (top first): ["top"] for one
  level, ["top", "bottom"] for two, ["top", "middle", "bottom"] for three (``vqprior.levels``).
- ``b"%08d" % i`` for i in 0..N-1: one record per item: a 16-byte little-endian header ``struct.pack("<qq",
  label, source_index)`` (label -1 when the dataset has none; ``source_index`` is the item's index in the source
  split), then the codes of every level in ``level_names`` order, each ``h * w`` little-endian uint16 values in
  row-major order (``numpy.frombuffer(value, "<u2", h * w, offset)``).
- ``b"__complete__"``: ``b"1"``, written last in its own transaction. A cache without it is unfinished (an
  interrupted extraction) and readers refuse it; re-running the extraction rebuilds it.

Reading without vqprior::

    env = lmdb.open(path, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"__complete__") is not None
        meta = json.loads(txn.get(b"__meta__"))
        value = txn.get(b"%08d" % 0)
        label, index = struct.unpack_from("<qq", value)
        top = numpy.frombuffer(value, "<u2", h * w, offset=16).reshape(h, w)   # (h, w) = meta["shapes"][0]
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqprior.data.lmdb_store import begin_read, close_reader
from vqprior.errors import UserError

log = logging.getLogger(__name__)

FORMAT_NAME = "vqprior-codes"
FORMAT_VERSION = 1
META_KEY = b"__meta__"
COMPLETE_KEY = b"__complete__"
HEADER = struct.Struct("<qq")  # label, source index
CODE_DTYPE = np.dtype("<u2")


def record_key(i: int) -> bytes:
    return b"%08d" % i


def encode_record(label: int, index: int, codes: list[np.ndarray]) -> bytes:
    """One record: the ``<qq`` header then each level's codes as little-endian uint16, row-major."""
    return HEADER.pack(int(label), int(index)) + b"".join(np.ascontiguousarray(c, CODE_DTYPE).tobytes()
                                                          for c in codes)


def decode_record(value: bytes, shapes: list[tuple[int, int]], where: str = "record"):
    """Inverse of ``encode_record``: (label, source index, [uint16 (h, w) per level]). UserError on a bad size."""
    expected = HEADER.size + CODE_DTYPE.itemsize * sum(h * w for h, w in shapes)
    if len(value) != expected:
        raise UserError(f"corrupt code cache: {where} has {len(value)} bytes, expected {expected}")
    label, index = HEADER.unpack_from(value)
    codes, offset = [], HEADER.size
    for h, w in shapes:
        codes.append(np.frombuffer(value, CODE_DTYPE, h * w, offset).reshape(h, w))
        offset += CODE_DTYPE.itemsize * h * w
    return label, index, codes


def validate_codes(codes, codebook_size: int, where: str = "codes") -> None:
    """UserError (one line) if any code is outside [0, codebook_size)."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise UserError(f"{where}: codes outside the codebook: values must be in [0, {codebook_size - 1}], "
                        f"found [{int(codes.min())}, {int(codes.max())}]")


def check_codebook(cache_meta: dict[str, Any], prior_num_codes: int, level: str) -> None:
    """UserError unless the cache has ``level`` and its codebook size equals the prior's ``num_codes``."""
    names = list(cache_meta["level_names"])
    if level not in names:
        raise UserError(f"the code cache has no {level} level (it has {cache_meta['levels']} level(s): "
                        f"{', '.join(names)})")
    size = int(cache_meta["codebook_sizes"][names.index(level)])
    if size != int(prior_num_codes):
        raise UserError(f"codebook size mismatch: the code cache's {level} level has {size} codes but the prior "
                        f"models {prior_num_codes}")


def _open_writer(path: Path, map_size: int):
    import lmdb

    try:
        return lmdb.open(str(path), map_size=map_size, meminit=False, metasync=False, readahead=False)
    except lmdb.Error as e:
        raise UserError(f"cannot open the code cache {path}: {str(e).splitlines()[0][:160]}") from None


def _begin_read(path: Path):
    """A read transaction on this process's shared handle of the code cache at ``path`` (``lmdb_store``)."""
    import lmdb

    try:
        return begin_read(path)
    except lmdb.Error as e:
        raise UserError(f"cannot open the code cache {path}: {str(e).splitlines()[0][:160]}") from None


def _read_state(path: Path) -> tuple[str, dict[str, Any] | None]:
    """("complete" | "unfinished" | "empty" | "foreign", metadata or None) for an existing folder."""
    if not (path / "data.mdb").exists():
        return ("empty" if not any(path.iterdir()) else "foreign"), None
    with _begin_read(path) as txn:
        raw, complete, entries = txn.get(META_KEY), txn.get(COMPLETE_KEY), txn.stat()["entries"]
    if raw is None:  # killed before the metadata commit: our own empty cache, or someone else's database
        return ("unfinished" if entries == 0 else "foreign"), None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "foreign", None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return "foreign", None
    return ("complete" if complete is not None else "unfinished"), meta


def read_code_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a finished code cache; one-line UserErrors for anything else."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"code cache not found: {path}")
    if not path.is_dir():
        raise UserError(f"expected a code cache folder (LMDB), got a file: {path}")
    if not (path / "data.mdb").exists():
        raise UserError(f"not an LMDB code cache (no data.mdb): {path}")
    state, meta = _read_state(path)
    if state == "foreign":
        raise UserError(f"not a vqprior code cache (no vqprior metadata record): {path}")
    if state == "unfinished":
        raise UserError(f"the code cache is unfinished (an interrupted extraction?): {path}; "
                        f"re-run vqprior extract-codes to rebuild it")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"code cache format {version} is newer than this vqprior understands "
                        f"({FORMAT_VERSION}): {path}")
    return meta


class CodeDataset(Dataset):
    """Items ``{"top": int64 (h, w), ("middle": ..., )"bottom": int64 (h, w) (2+ levels), "label": int64, "index":
    int64}``, one entry per level named as in ``level_names``.

    ``level`` (a level name or None) only checks the cache has that level and selects ``codebook_size``; every
    level is returned, since a lower level's prior needs the codes of the level above as its condition. The LMDB
    environment is opened lazily in each process (it cannot be pickled to spawned DataLoader workers).
    """

    def __init__(self, path: str | os.PathLike, level: str | None = None):
        self.path = str(path)
        self.metadata = read_code_metadata(path)
        meta = self.metadata
        self.levels = int(meta["levels"])
        self.level_names = tuple(meta["level_names"])
        self.shapes = [tuple(int(v) for v in s) for s in meta["shapes"]]
        self.codebook_sizes = [int(k) for k in meta["codebook_sizes"]]
        if level is not None and level not in self.level_names:
            raise UserError(f"the code cache has no {level} level (it has {self.levels} level(s): "
                            f"{', '.join(self.level_names)}): {self.path}")
        self.level = level
        self.codebook_size = self.codebook_sizes[self.level_names.index(level) if level else 0]
        self.num_classes = int(meta.get("num_classes", 0))
        self._count = int(meta["count"])

    def __len__(self) -> int:
        return self._count

    def _txn(self):
        return _begin_read(Path(self.path))  # opened on first use in each process

    def _decode(self, i: int, value: bytes | None) -> dict[str, torch.Tensor]:
        where = f"record {i} of {self.path}"
        if value is None:
            raise UserError(f"corrupt code cache: {where} is missing")
        label, index, codes = decode_record(value, self.shapes, where)
        item = {}
        for name, c, size in zip(self.level_names, codes, self.codebook_sizes):
            validate_codes(c, size, f"{where} ({name} level)")
            item[name] = torch.from_numpy(c.astype(np.int64))
        item["label"] = torch.tensor(label, dtype=torch.int64)
        item["index"] = torch.tensor(index, dtype=torch.int64)
        return item

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"index {i} out of range for {self._count} records")
        with self._txn() as txn:
            return self._decode(i, txn.get(record_key(i)))

    def validate_records(self) -> None:
        """Read every record once (sizes and code ranges): turns a corrupt cache into one clear error up front,
        instead of a failure inside a DataLoader worker later."""
        with self._txn() as txn:
            for i in range(self._count):
                self._decode(i, txn.get(record_key(i)))


def _prepare_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace a finished cache (unless ``overwrite``) or anything that is not one of our caches."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out must be an LMDB folder, but a file exists there: {path}")
    if not path.exists():
        try:
            path.mkdir(parents=True)  # missing parents too, like the train commands' run folders
        except OSError as e:
            raise UserError(f"cannot create the code cache folder {path}: {e.strerror}") from None
        return
    state, _ = _read_state(path)
    if state == "complete" and not overwrite:
        raise UserError(f"{path} is a finished code cache; pass --overwrite to replace it")
    if state == "foreign":
        raise UserError(f"{path} exists and is not a vqprior code cache; choose another --out")
    if state == "unfinished":
        log.info("rebuilding the unfinished code cache %s", path)


def _estimate_map_size(count: int, record_bytes: int) -> int:
    # Records over ~2 KB go to LMDB overflow pages (whole 4 KB pages); the map is sparse, so overestimate freely.
    per_record = 2 * record_bytes + 4096 + 256
    return max(1 << 26, count * per_record + (1 << 26))


@torch.no_grad()
def extract_codes(vqvae, dataset, out_path: str | os.PathLike, vqvae_sha256: str, dataset_name: str, split: str,
                  batch_size: int = 64, device: str | torch.device = "cpu", overwrite: bool = False,
                  progress: bool = True, num_workers: int = 0, vqvae_path: str = "") -> dict[str, Any]:
    """Encode every item {"image": uint8 (C, H, W), "label", "index"} of ``dataset`` with ``vqvae`` and write the
    code cache at ``out_path`` (format in the module docstring). Returns the cache metadata.

    The completion marker is written last: an interrupted run leaves an unfinished cache that readers refuse and
    that re-running this function rebuilds. A finished cache is replaced only with ``overwrite``.
    """
    from tqdm import tqdm

    path = Path(out_path)
    count = len(dataset)
    if count == 0:
        raise UserError("the dataset is empty: nothing to extract")
    if batch_size < 1:
        raise UserError(f"batch-size must be a positive integer, got {batch_size}")
    image_shape = tuple(int(v) for v in dataset[0]["image"].shape)
    vq = getattr(vqvae, "module", vqvae).to(device).eval()
    if len(image_shape) != 3 or image_shape[0] != vq.config.channels:
        raise UserError(f"the VQ-VAE expects {vq.config.channels}-channel images, the dataset has shape "
                        f"{image_shape}")
    shapes = vq.code_shapes(image_shape[1], image_shape[2])
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "levels": vq.config.levels,
            "level_names": list(vq.level_names), "shapes": [list(s) for s in shapes],
            "codebook_sizes": [vq.config.codebook_size] * vq.config.levels, "dataset": dataset_name,
            "split": split, "vqvae_sha256": vqvae_sha256, "count": count, "image_shape": list(image_shape),
            "num_classes": int(getattr(dataset, "num_classes", 0) or 0), "record_header": HEADER.format,
            "code_dtype": CODE_DTYPE.str, "vqvae_path": str(vqvae_path)}
    _prepare_output(path, overwrite)
    close_reader(path)  # our own read handle (from the checks above or an earlier CodeDataset) must not stay open
    record_bytes = HEADER.size + CODE_DTYPE.itemsize * sum(h * w for h, w in shapes)
    env = _open_writer(path, map_size=_estimate_map_size(count, record_bytes))
    try:
        # Unmark first, in its own transaction: from here until the end the cache reads as unfinished.
        with env.begin(write=True) as txn:
            txn.delete(COMPLETE_KEY)
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(), delete=False)
            txn.put(META_KEY, json.dumps(meta, sort_keys=True).encode("utf-8"))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        written = 0
        with tqdm(total=count, disable=not progress, desc="extract codes", unit="img", dynamic_ncols=True) as bar:
            for batch in loader:
                images = batch["image"].to(device)
                n = images.shape[0]
                codes = [c.cpu().numpy() for c in vq.encode(images)]
                labels = batch["label"].tolist() if "label" in batch else [-1] * n
                indices = batch["index"].tolist() if "index" in batch else list(range(written, written + n))
                with env.begin(write=True) as txn:
                    for j in range(n):
                        txn.put(record_key(written + j), encode_record(labels[j], indices[j], [c[j] for c in codes]))
                written += n
                bar.update(n)
        if written != count:
            raise UserError(f"the dataset yielded {written} items but reports {count}")
        env.sync(True)  # every record is on disk before the marker says so
        with env.begin(write=True) as txn:
            txn.put(COMPLETE_KEY, b"1")
        env.sync(True)
    finally:
        env.close()
    return meta
