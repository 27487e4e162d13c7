"""What an LMDB cache holds, as plain data, for ``vqprior info``: code caches (``extract-codes --out``), image cache
environments and ``--cache`` folders of them (one entry per environment).

Read-only; each kind is opened through its own module's shared reader (py-lmdb refuses a second handle on one
environment in a process).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqprior.data import codes, image_cache
from vqprior.data.lmdb_store import begin_read, open_reader
from vqprior.errors import UserError


def _used_bytes(env) -> int:
    """Bytes of the environment in use (pages up to the last written one), not the sparse file's map size."""
    return (env.info()["last_pgno"] + 1) * env.stat()["psize"]


def describe_code_cache(path: Path) -> dict[str, Any]:
    meta = codes.read_code_metadata(path)
    count = int(meta["count"])
    used = _used_bytes(open_reader(path))
    levels = [{"level": name, "shape": list(shape), "codebook_size": int(size)}
              for name, shape, size in zip(meta["level_names"], meta["shapes"], meta["codebook_sizes"])]
    return {"kind": "code cache", "path": str(path), "complete": True, "count": count, "levels": levels,
            "num_classes": int(meta.get("num_classes", 0)), "vqvae_sha256": meta.get("vqvae_sha256", ""),
            "built_from": {k: meta.get(k) for k in ("dataset", "split", "image_shape", "vqvae_path")},
            "format_version": meta.get("format_version"), "bytes": used, "bytes_per_item": used / max(1, count)}


def describe_image_cache(path: Path) -> dict[str, Any]:
    meta, complete = image_cache.read_cache_state(path)
    if meta is None:
        raise UserError(f"not a vqprior image cache (no metadata record): {path}")
    written = image_cache.count_written(path, meta)
    with begin_read(path):  # adopts a map grown by a build in another process
        used = _used_bytes(open_reader(path))
    count = int(meta["count"])
    return {"kind": "image cache", "path": str(path), "complete": complete, "count": count,
            "written": count if complete else written, "shape": list(meta["shape"]),
            "num_classes": int(meta.get("num_classes", 0)), "encoding": image_cache.encoding_of(meta),
            "built_from": {k: meta.get(k) for k in ("dataset", "split", "image_size", "data_dir", "limit")},
            "format_version": meta.get("format_version"), "bytes": used,
            "bytes_per_item": used / max(1, count if complete else written)}


def _is_code_cache(path: Path) -> bool:
    """Whether the environment at ``path`` holds a code cache (its metadata record says so)."""
    with begin_read(path) as txn:
        raw = txn.get(codes.META_KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    return isinstance(meta, dict) and meta.get("format") == codes.FORMAT_NAME


def describe_cache(path) -> list[dict[str, Any]]:
    """Facts of the cache at ``path``: one dict for a code cache or an image cache environment, one per environment
    for a ``--cache`` folder. UserError (one line) when ``path`` holds no vqprior cache."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"not a cache folder: {path}")
    if (path / "data.mdb").is_file():
        if _is_code_cache(path):
            codes.read_code_metadata(path)  # one-line errors for an unfinished or newer code cache
            return [describe_code_cache(path)]
        return [describe_image_cache(path)]
    envs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "data.mdb").is_file())
    if not envs:
        raise UserError(f"no vqprior cache in {path} (neither an LMDB environment nor a --cache folder of them)")
    return [describe_image_cache(p) for p in envs]


__all__ = ["describe_cache", "describe_code_cache", "describe_image_cache"]
