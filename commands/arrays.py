"""Reading and writing the raw sampled arrays (.npy / .npz), atomically and without pickle."""
from __future__ import annotations

import zipfile

import numpy as np

from vqprior.checkpoint import atomic_write
from vqprior.errors import UserError


def save_npy(path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def save_codes_file(path, codes) -> None:
    """One level: an int64 (N, H, W) .npy; two levels: an .npz with arrays ``top`` and ``bottom``."""
    arrays = [c.cpu().numpy().astype(np.int64) for c in codes]
    if len(arrays) == 1:
        save_npy(path, arrays[0])
        return

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, top=arrays[0], bottom=arrays[1])

    atomic_write(path, write)


def load_codes_file(path) -> list[np.ndarray]:
    """Inverse of save_codes_file: [codes] from .npy, [top, bottom] from .npz. One-line errors on bad files."""
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
                if not {"top", "bottom"} <= set(data.files):
                    raise UserError(f"{p}: an .npz codes file needs arrays 'top' and 'bottom'")
                arrays = [data["top"], data["bottom"]]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated, damaged, or object arrays
        raise UserError(f"not a readable .npy/.npz codes file: {p} ({str(e).splitlines()[0][:100]})") from None
    for a in arrays:
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
            raise UserError(f"{p}: codes must be integer arrays of shape (N, H, W), got {a.dtype} {a.shape}")
    return arrays
