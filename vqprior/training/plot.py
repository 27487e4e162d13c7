"""Learning curves of training runs (``vqprior plot``): read each run's ``metrics.jsonl`` and draw its held-out and
training metric against steps and against training time, several runs overlaid, into one image file.

The metric is one of ``METRICS``: bits/dim of a pixel model (``bpd``), bits per code of a code prior
(``bits_per_code``), or the PSNR / MSE of a VQ-VAE (the training PSNR is computed from the logged training MSE).

Training time of a record is its cumulative ``train_seconds`` when the record carries one. Older runs only log the
throughput ``items_per_s`` of the window since the previous train record; their time is then the sum of the window
lengths ``items / items_per_s``, with ``items = (steps - skipped steps) * batch size`` (the trainer counts only the
items of steps it took) and the batch size read from the run's ``latest.pt``. The window includes any eval, sample
grid or checkpoint written inside it, so this estimate is wall time of the loop. A held-out record gets the time of
the training step it follows (its own ``train_seconds`` when present).

matplotlib is an optional dependency (``pip install 'vqprior[plot]'``), imported only to draw.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqprior.errors import UserError
from vqprior.io import atomic_write

# name -> axis label. Order = preference when a run logs several (a VQ-VAE logs both psnr and mse).
METRICS = {
    "bpd": "bits/dim",
    "bits_per_code": "bits/code",
    "psnr": "PSNR (dB)",
    "mse": "MSE (0..255 scale)",
}
X_AXES = ("steps", "time", "both")
SPLITS = ("both", "eval", "train")
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
METRICS_NAME = "metrics.jsonl"


@dataclass
class Curve:
    """One split of one run: ``steps``, ``values`` and (when known) cumulative training ``seconds``, aligned."""
    steps: np.ndarray
    values: np.ndarray
    seconds: np.ndarray | None


@dataclass
class Run:
    """The records of one run folder: ``train`` and ``eval`` lists of dicts, sorted by step, one per step."""
    path: Path
    train: list[dict]
    eval: list[dict]

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)


def read_run(run_dir: str | os.PathLike) -> Run:
    """Parse ``run_dir/metrics.jsonl``. A line cut by a kill mid-write is skipped; when a step was logged twice (a
    killed run logs steps again after ``--resume``), the last record wins."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"not a run folder: {path}" if path.exists() else f"run folder not found: {path}")
    metrics = path / METRICS_NAME
    if not metrics.is_file():
        raise UserError(f"not a run folder (no {METRICS_NAME}): {path}")
    by_split: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("split") not in by_split:
                continue
            step = record.get("step")
            if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                by_split[record["split"]][step] = record
    if not by_split["train"] and not by_split["eval"]:
        raise UserError(f"{metrics} holds no training or held-out records")
    return Run(path, *[[records[s] for s in sorted(records)] for records in (by_split["train"], by_split["eval"])])


def _value(record: dict, metric: str) -> float | None:
    """The metric of a record as a float, or None. Training PSNR comes from the training MSE (none is logged)."""
    v = record.get(metric)
    if v is None and metric == "psnr" and record.get("split") == "train" and _number(record.get("mse")):
        from vqprior.evaluation.metrics import psnr_from_mse

        v = psnr_from_mse(float(record["mse"]))
    return float(v) if _number(v) else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def available_metrics(run: Run) -> list[str]:
    """The ``METRICS`` this run logged, in preference order."""
    return [m for m in METRICS if any(_value(r, m) is not None for r in run.train + run.eval)]


def choose_metric(runs: list[Run], metric: str | None) -> str:
    """``metric`` when every run logs it; without one, the preferred metric when all runs agree on it."""
    found = [available_metrics(run) for run in runs]
    if metric is not None:
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        for run, have in zip(runs, found):
            if metric not in have:
                logged = ", ".join(have) or "none of " + ", ".join(METRICS)
                raise UserError(f"run {run.path} has no {metric} records (it logs {logged})")
        return metric
    for run, have in zip(runs, found):
        if not have:
            raise UserError(f"run {run.path} logs none of the plottable metrics ({', '.join(METRICS)})")
    preferred = {have[0] for have in found}
    if len(preferred) > 1:
        kinds = "; ".join(f"{run.name}: {have[0]}" for run, have in zip(runs, found))
        raise UserError(f"the runs log different metrics ({kinds}); plot runs of one kind together or choose one "
                        f"with --metric")
    return preferred.pop()


def batch_size_of(run: Run) -> int | None:
    """The training batch size stored in the run's ``latest.pt`` (None when there is no readable checkpoint)."""
    from vqprior.checkpoint import read_checkpoint
    from vqprior.training.run_state import CHECKPOINT_NAME

    try:
        data = read_checkpoint(run.path / CHECKPOINT_NAME)
        size = data["config"]["train"]["batch_size"]
    except (UserError, KeyError, TypeError):
        return None
    return int(size) if _number(size) and size > 0 else None


def train_seconds(records: list[dict], batch_size: int | None) -> np.ndarray | None:
    """Cumulative training seconds at each train record: logged ``train_seconds`` when every record has it, else
    the ``items_per_s`` estimate (see the module docstring); None when neither is possible."""
    if records and all(_number(r.get("train_seconds")) for r in records):
        return np.array([float(r["train_seconds"]) for r in records])
    if not batch_size or not all(_number(r.get("items_per_s")) and r["items_per_s"] > 0 for r in records):
        return None
    seconds, total, prev_step, prev_skipped = [], 0.0, 0, 0
    for r in records:
        skipped = int(r.get("skipped_steps", 0) or 0)
        # skipped_steps counts from the start of the process: it restarts at 0 after a resume.
        new_skipped = skipped - prev_skipped if skipped >= prev_skipped else skipped
        taken = max(r["step"] - prev_step - new_skipped, 0)
        total += taken * batch_size / float(r["items_per_s"])
        seconds.append(total)
        prev_step, prev_skipped = r["step"], skipped
    return np.array(seconds)


def _curve(records: list[dict], metric: str, seconds: np.ndarray | None) -> Curve | None:
    keep = [(i, r["step"], _value(r, metric)) for i, r in enumerate(records)]
    keep = [(i, s, v) for i, s, v in keep if v is not None and math.isfinite(v)]  # inf PSNR: a perfect reconstruction
    if not keep:
        return None
    index = [i for i, _, _ in keep]
    return Curve(np.array([s for _, s, _ in keep]), np.array([v for _, _, v in keep], dtype=float),
                 None if seconds is None else seconds[index])


def run_curves(run: Run, metric: str) -> tuple[Curve | None, Curve | None]:
    """(training curve, held-out curve) of ``metric``; each None when the run logged none of it."""
    needs_estimate = not all(_number(r.get("train_seconds")) for r in run.train)
    seconds = train_seconds(run.train, batch_size_of(run) if needs_estimate else None) if run.train else None
    eval_seconds = None
    if run.eval and all(_number(r.get("train_seconds")) for r in run.eval):
        eval_seconds = np.array([float(r["train_seconds"]) for r in run.eval])
    elif seconds is not None:
        # An eval runs right after the training step it is logged with: the time of that step (interpolated
        # between train records, which come every 10 steps).
        steps = np.array([0] + [r["step"] for r in run.train], dtype=float)
        eval_seconds = np.interp([r["step"] for r in run.eval], steps, np.concatenate([[0.0], seconds]))
    return _curve(run.train, metric, seconds), _curve(run.eval, metric, eval_seconds)


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with debiasing (TensorBoard's smoothing): ``weight`` 0 returns the values."""
    if not 0.0 <= weight < 1.0:
        raise UserError(f"--smooth must be in [0, 1), got {weight}")
    if weight == 0.0 or len(values) == 0:
        return np.asarray(values, dtype=float)
    out, last = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        last = weight * last + (1.0 - weight) * float(v)
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds >= 2 * 3600:
        return 3600.0, "hours"
    if max_seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("vqprior plot needs matplotlib: pip install 'vqprior[plot]'") from None
    return Figure


def select_curves(runs: list[Run], *, labels: list[str] | None = None, metric: str | None = None, x: str = "both",
                  split: str = "both") -> tuple[str, list[tuple[str, dict]]]:
    """(metric, [(label, {"train": Curve | None, "eval": Curve | None}), ...]) of what ``plot_runs`` draws; a
    UserError when a run cannot be drawn as asked."""
    if not runs:
        raise UserError("no run folders given")
    if x not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    labels = list(labels) if labels else _default_labels(runs)
    if len(labels) != len(runs):
        raise UserError(f"{len(labels)} --label given for {len(runs)} runs; give one per run or none")
    metric = choose_metric(runs, metric)
    curves = []
    for run, label in zip(runs, labels):
        train, held_out = run_curves(run, metric)
        shown = {"train": train if split in ("both", "train") else None,
                 "eval": held_out if split in ("both", "eval") else None}
        if shown["train"] is None and shown["eval"] is None:
            wanted = {"both": "training or held-out", "eval": "held-out", "train": "training"}[split]
            raise UserError(f"run {run.path} has no {wanted} {metric} records")
        if x in ("time", "both") and any(c is not None and c.seconds is None for c in shown.values()):
            raise UserError(f"cannot tell the training time of run {run.path}: its records have no train_seconds "
                            f"and no items_per_s with a readable latest.pt (use --x steps)")
        curves.append((label, shown))
    return metric, curves


def draw_curves(metric: str, curves: list[tuple[str, dict]], *, x: str = "both", smoothing: float = 0.0,
                title: str | None = None):
    """A matplotlib Figure of ``select_curves``' result: one panel per x axis, one colour per run, the held-out
    curve solid with dots, the training curve dashed (EMA-smoothed by ``smoothing``, the raw one faint behind)."""
    smooth([], smoothing)  # validate
    Figure = _matplotlib()
    axes_kinds = ["steps", "time"] if x == "both" else [x]
    fig = Figure(figsize=(6.4 * len(axes_kinds), 4.4), layout="constrained")
    axes = fig.subplots(1, len(axes_kinds), sharey=True, squeeze=False)[0]
    max_seconds = max((float(c.seconds.max()) for _, shown in curves for c in shown.values()
                       if c is not None and c.seconds is not None and len(c.seconds)), default=0.0)
    unit, unit_name = _time_unit(max_seconds)
    for ax, kind in zip(axes, axes_kinds):
        for i, (label, shown) in enumerate(curves):
            _draw_run(ax, kind, unit, f"C{i % 10}", label, shown, smoothing)
        ax.set_xlabel("training step" if kind == "steps" else f"training time ({unit_name})")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(METRICS[metric] + (" (higher is better)" if metric == "psnr" else " (lower is better)"))
    axes[-1].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(runs: list[Run], out: str | os.PathLike, *, labels: list[str] | None = None, metric: str | None = None,
              x: str = "both", split: str = "both", smoothing: float = 0.0, title: str | None = None) -> dict:
    """Draw the curves of ``runs`` into ``out`` (.png, .pdf or .svg), written atomically.

    ``x``: "steps", "time" or "both" (two panels); ``split``: "both", "eval" (held-out) or "train"; ``smoothing``:
    EMA weight of the training curve. Returns {"metric", "runs": {label: {"train", "eval": last value or None}}}.
    """
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise UserError(f"--out must end in {', '.join(FORMATS)}, got {Path(out).name}")
    smooth([], smoothing)
    metric, curves = select_curves(runs, labels=labels, metric=metric, x=x, split=split)
    fig = draw_curves(metric, curves, x=x, smoothing=smoothing, title=title)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    return {"metric": metric, "runs": {label: {k: (float(c.values[-1]) if c is not None else None)
                                               for k, c in shown.items()} for label, shown in curves}}


def _draw_run(ax, kind: str, unit: float, color: str, label: str, shown: dict, smoothing: float) -> None:
    def xs(c: Curve):
        return c.steps if kind == "steps" else c.seconds / unit

    train, held_out = shown["train"], shown["eval"]
    if train is not None:
        if smoothing > 0:
            ax.plot(xs(train), train.values, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(xs(train), smooth(train.values, smoothing), color=color, alpha=0.75, linewidth=1.0,
                linestyle="--", label=f"{label} (train)")
    if held_out is not None:
        ax.plot(xs(held_out), held_out.values, color=color, linewidth=1.8, marker="o", markersize=3.5,
                label=f"{label} (held-out)")


def _default_labels(runs: list[Run]) -> list[str]:
    """Folder names; the paths as given where two runs share a name."""
    names = [run.name for run in runs]
    return [str(run.path) if names.count(run.name) > 1 else run.name for run in runs]


__all__ = ["METRICS", "Run", "Curve", "read_run", "available_metrics", "choose_metric", "train_seconds",
           "run_curves", "smooth", "select_curves", "draw_curves", "plot_runs"]
