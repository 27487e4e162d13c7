"""Score tables as CSV: one row per image (``item``: its index in a split or its file, ``label``: its class or
empty), then one column per score (vqprior.evaluation.scoring), written atomically and read back strictly."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from vqprior.errors import UserError
from vqprior.io import atomic_write

KEYS = ("item", "label")


def write_scores(path, items: list, labels: list | None, columns: dict[str, np.ndarray]) -> None:
    """``items`` and ``labels`` (None: unlabelled) per row, then the score columns, floats as repr (exact)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*KEYS, *columns])
    for i, item in enumerate(items):
        label = "" if labels is None else int(labels[i])
        writer.writerow([item, label, *(repr(float(columns[name][i])) for name in columns)])
    text = buffer.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_scores(path) -> dict[str, np.ndarray]:
    """The score columns of a table ``write_scores`` wrote (item and label dropped), as float64 arrays."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read score table {path} ({type(e).__name__})") from None
    if not rows or tuple(rows[0][:2]) != KEYS or len(rows[0]) < 3:
        raise UserError(f"{path} is not a score table (vqprior score --out): expected the columns item, label, "
                        "then scores")
    names, body = rows[0][2:], rows[1:]
    if not body:
        raise UserError(f"{path} holds no scores (no rows)")
    try:
        values = np.array([[float(v) for v in row[2:]] for row in body], dtype=np.float64)
    except ValueError:
        values = None
    if values is None or values.shape != (len(body), len(names)) or not all(math.isfinite(v) for v in values.flat):
        raise UserError(f"{path}: every row needs {len(names)} finite scores")
    return {name: values[:, j] for j, name in enumerate(names)}
