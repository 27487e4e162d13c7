"""Files written safely: atomic replacement, torch.save that reports a full disk, a file's sha256.

The lowest layer of the package with errors.py: it imports no model, so data, images, plots and checkpoints all
write through it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from vqprior.errors import UserError


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    An interruption leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs should have the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def torch_save_file(data: Any, tmp: str) -> None:
    """``torch.save`` into ``tmp``, with write failures (a full disk) raised as the OSError they are."""
    with open(tmp, "wb") as f:
        try:
            torch.save(data, f)
        except RuntimeError as e:
            # torch's zip writer reports a failed write as a RuntimeError with the OSError as its context; surface
            # the OSError so that commands report "File too large" / "No space left on device" in one line.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
