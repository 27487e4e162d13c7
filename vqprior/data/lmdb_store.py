"""This process's read-only LMDB handles, shared by the image cache and the code cache.

LMDB refuses to open one environment twice in a process, so every reader in a process shares one read-only handle
per environment, keyed by its real path (a symlinked path is the same environment). Each entry remembers the pid
that opened it, since a handle inherited through fork must not be used in the child, and the data file's inode,
since a cache rebuilt by another process is a new file: either way the handle is closed and reopened. A lock makes the
registry safe for DataLoader threads.
"""
from __future__ import annotations

import os
import threading

import lmdb

_READERS: dict[str, tuple[int, int, lmdb.Environment]] = {}
_LOCK = threading.Lock()


def open_reader(path: str | os.PathLike) -> lmdb.Environment:
    """This process's shared read-only handle on the environment at ``path`` (raises ``lmdb.Error`` as LMDB does)."""
    key = os.path.realpath(path)
    inode = os.stat(os.path.join(key, "data.mdb")).st_ino
    with _LOCK:
        entry = _READERS.get(key)
        if entry is None or entry[:2] != (os.getpid(), inode):
            if entry is not None:
                entry[2].close()  # replaced on disk, or inherited through fork: closing the child's copy leaves
                # the parent's intact, and LMDB opens the path again only once it is closed here
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False)
            _READERS[key] = entry = (os.getpid(), inode, env)
        return entry[2]


def begin_read(path: str | os.PathLike, buffers: bool = False) -> lmdb.Transaction:
    """A read transaction on the shared handle. When another process (a build) has grown the map beyond this
    handle's size, LMDB says MDB_MAP_RESIZED: adopt the new size and begin again."""
    env = open_reader(path)
    try:
        return env.begin(buffers=buffers)
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        return env.begin(buffers=buffers)


def close_reader(path: str | os.PathLike) -> None:
    """Close this process's shared handle on ``path`` (before writing to it, or when a dataset is closed)."""
    with _LOCK:
        entry = _READERS.pop(os.path.realpath(path), None)
    if entry is not None:
        entry[2].close()
