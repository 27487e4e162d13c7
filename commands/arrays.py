"""Reading and writing the raw sampled arrays (.npy / .npz), atomically and without pickle."""
from __future__ import annotations

import zipfile

import numpy as np

from vqprior.errors import UserError
from vqprior.io import atomic_write


def save_npy(path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def save_codes_file(path, codes) -> None:
    """One level: an int64 (N, H, W) .npy; two or more: an .npz with one array per level, named like the levels
    (``top`` and ``bottom``; ``top``, ``middle``, ``bottom`` for three; see ``vqprior.levels``)."""
    from vqprior.levels import level_names

    arrays = [c.cpu().numpy().astype(np.int64) for c in codes]
    if len(arrays) == 1:
        save_npy(path, arrays[0])
        return

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(level_names(len(arrays)), arrays)))

    atomic_write(path, write)


def _npz_levels(files: list[str], p) -> list[str]:
    """The level arrays of an .npz codes file, coarsest first: every level of a hierarchy (top, middle, bottom),
    or at least top and bottom (other arrays ignored, as they always were)."""
    from vqprior.levels import MAX_LEVELS, level_names

    for n in range(3, MAX_LEVELS + 1):
        if set(level_names(n)) == set(files):
            return list(level_names(n))
    if not {"top", "bottom"} <= set(files):
        raise UserError(f"{p}: an .npz codes file needs arrays 'top' and 'bottom' (and the middle levels' between "
                        f"them for 3+ levels)")
    return ["top", "bottom"]


def load_codes_file(path) -> list[np.ndarray]:
    """Inverse of save_codes_file: [codes] from .npy, [top, (middle...,) bottom] from .npz. One-line errors on bad
    files."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"codes file not found: {p}")
    if p.is_dir():
        raise UserError(f"expected a codes file, got a folder: {p}")
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # numpy would try to unpickle anything else
        raise UserError(f"not a .npy/.npz codes file: {p}")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            arrays = [data]
        else:
            with data:
                arrays = [data[name] for name in _npz_levels(data.files, p)]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated, damaged, or object arrays
        raise UserError(f"not a readable .npy/.npz codes file: {p} ({str(e).splitlines()[0][:100]})") from None
    for a in arrays:
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{p}: codes must be integer arrays of shape (N, H, W), got {a.dtype} {a.shape}")
    return arrays
