"""``vqprior plot``: learning curves of one or more run folders (held-out and training metric vs steps and time)."""
from __future__ import annotations

import click

from vqprior.commands.common import check_outputs, guarded


@click.command("plot")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Image to write: .png, .pdf or .svg.")
@click.option("--label", "labels", multiple=True,
              help="Legend name of a run, once per RUN_DIR in order (default: the folder names).")
@click.option("--metric", type=click.Choice(["bpd", "bits_per_code", "psnr", "mse"]), default=None,
              help="What to draw (default: bpd, bits_per_code or psnr, whichever the runs log).")
@click.option("--x", "x_axis", type=click.Choice(["steps", "time", "both"]), default="both", show_default=True,
              help="Against training steps, training time, or both side by side.")
@click.option("--split", type=click.Choice(["both", "eval", "train"]), default="both", show_default=True,
              help="Held-out (eval) curve, training curve, or both.")
@click.option("--smooth", "smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="EMA weight for the training curve, e.g. 0.9 (0: raw; the raw curve stays faint behind).")
@click.option("--title", default=None, help="Figure title.")
@guarded
def plot(run_dirs, out, labels, metric, x_axis, split, smoothing, title):
    """Draw the learning curves of the RUN_DIR folders (their metrics.jsonl) into one image, runs overlaid.

    Needs matplotlib: pip install 'vqprior[plot]'.
    """
    from vqprior.training.plot import plot_runs, read_run

    if labels and len(labels) != len(run_dirs):
        raise click.UsageError(f"{len(labels)} --label given for {len(run_dirs)} run folders; give one per run "
                               f"folder or none")
    check_outputs(out)
    runs = [read_run(d) for d in run_dirs]
    summary = plot_runs(runs, out, labels=list(labels) or None, metric=metric, x=x_axis, split=split,
                        smoothing=smoothing, title=title)
    last = "; ".join(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)
                     for label, values in summary["runs"].items())
    click.echo(f"wrote {summary['metric']} curves of {len(runs)} run(s) to {out} (last: {last})")
