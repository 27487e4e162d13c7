"""``vqprior score`` (per-image out-of-distribution scores as a CSV) and ``vqprior ood-eval`` (how well each score
separates an OOD set from an in-distribution one); the scores and metrics are vqprior.evaluation's."""
from __future__ import annotations

import click

from vqprior.commands import common
from vqprior.commands.common import device_option, guarded, precision_option
from vqprior.commands.options import DATASETS


@click.command("score")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--images", "images", multiple=True, type=click.Path(), metavar="PATH",
              help="Score these instead of a dataset split (repeatable): image files, folders of images (searched "
                   "recursively) or uint8 .npy arrays (N, C, H, W); converted to the model's channels, not resized.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Dataset to score (default: the one CKPT was trained on).")
@click.option("--data-dir", type=click.Path(), default=None, help="Dataset folder (default: the training one).")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Score only the first N items of the split (0: all).")
@click.option("--background", type=click.Path(), default=None,
              help="Pixel models: a background model (train-pixels --perturb) for the likelihood ratio.")
@click.option("--codec", type=click.Choice(["png", "webp"]), default=None,
              help="Pixel models: input complexity against this lossless codec (Pillow, strongest settings).")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="CSV to write, one row per image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@precision_option()
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@guarded
def score(checkpoint, dataset, data_dir, split, limit, images, background, codec, out, batch_size, precision, device,
          quiet):
    """Per-image scores of a dataset split or of image files, higher = more unusual, written to a CSV (item,
    label, one column per score) and summarised: bits_per_dim (EMA weights, the float32 likelihood of `evaluate`),
    likelihood_ratio (bits/dim minus the --background model's), complexity_CODEC (bits/dim minus the --codec
    file's bits/dim). A two-stage prior gives code_bits: bits per image of the codes at its level (the image
    encoded by its VQ-VAE). Compare two tables with `vqprior ood-eval`. See docs/ood.md.
    """
    import numpy as np

    from vqprior.checkpoint import load_model, read_checkpoint
    from vqprior.config import DataConfig
    from vqprior.evaluation.score_table import write_scores
    from vqprior.evaluation.scoring import score_images
    from vqprior.runtime.precision import autocast

    device = common.resolve_device(device)
    common.apply_precision(precision, device)
    stored = read_checkpoint(checkpoint, ("pixels", "prior"))
    model = load_model(checkpoint, device)
    back = load_model(background, device) if background else None
    if stored["kind"] == "prior" and stored.get("vqvae") is None:
        raise click.ClickException(f"{checkpoint} carries no VQ-VAE to encode images with")
    config = model.vqvae.config if stored["kind"] == "prior" else model.config
    if images:
        common.refuse_unused(("dataset", "data_dir", "split", "limit"), "with --images (the files are scored)")
        from vqprior.data.loader import load_image_files

        data, items = load_image_files(images, config.channels)
        labels, where = None, f"{len(images)} image input(s)"
    else:
        trained = DataConfig.from_dict(stored["config"]["data"] if stored["kind"] == "pixels"
                                       else stored["vqvae"]["config"]["data"])
        common.check_dataset_options(dataset or trained.dataset)
        data = common.load_checkpoint_split(trained, dataset, data_dir, split, limit, None, None, None)
        items, labels = list(range(len(data))), (data.labels if data.num_classes else None)
        where = f"{dataset or trained.dataset} {split}"
    _check_shape(data, model, stored["kind"])
    with autocast(device, precision):
        columns = score_images(model, data, device, back, codec, batch_size, progress=not quiet)
    write_scores(out, items, None if labels is None else labels[:len(data)].tolist(), columns)
    click.echo(f"{len(data)} images of {where} scored into {out}; means: "
               + ", ".join(f"{name} {np.mean(v):.4f}" for name, v in columns.items()))


def _check_shape(data, model, kind: str) -> None:
    if kind == "prior":
        vq = model.vqvae.config
        if data.channels != vq.channels or data.height % vq.total_stride or data.width % vq.total_stride:
            raise click.ClickException(f"images of {data.channels}x{data.height}x{data.width} do not fit the "
                                       f"prior's VQ-VAE ({vq.channels} channel(s), sides divisible by "
                                       f"{vq.total_stride})")
        return
    c = model.config
    if (data.channels, data.height, data.width) != (c.channels, c.height, c.width):
        raise click.ClickException(f"the images are {data.channels}x{data.height}x{data.width} but the model was "
                                   f"trained on {c.channels}x{c.height}x{c.width}")


@click.command("ood-eval")
@click.argument("inside", metavar="IN_CSV", type=click.Path())
@click.argument("outside", metavar="OOD_CSV", type=click.Path())
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the metrics as JSON.")
@click.option("--histograms", type=click.Path(), default=None, metavar="PREFIX",
              help="Write one histogram per score to PREFIX_<score>.png (needs matplotlib).")
@click.option("--names", nargs=2, default=("in", "OOD"), show_default=True, metavar="IN OOD",
              help="What to call the two sets in the histograms and the JSON.")
@guarded
def ood_eval(inside, outside, json_out, histograms, names):
    """How well each score of two `vqprior score` tables separates the OOD images (OOD_CSV, the positive class)
    from the in-distribution ones (IN_CSV): AUROC (ties count 1/2), AUPR and FPR at 95% TPR, printed as a table."""
    import json
    from pathlib import Path

    from vqprior.evaluation.ood import draw_histogram, separation
    from vqprior.evaluation.score_table import read_scores
    from vqprior.io import atomic_write

    ins, outs = read_scores(inside), read_scores(outside)
    metrics = separation(ins, outs)
    width = max(len(n) for n in metrics)
    lines = [f"{'score':<{width}}  AUROC   AUPR    FPR95   mean {names[0]} / {names[1]}"]
    for name, m in metrics.items():
        lines.append(f"{name:<{width}}  {m['auroc']:.4f}  {m['aupr']:.4f}  {m['fpr95']:.4f}  "
                     f"{m['mean_in']:.4f} / {m['mean_out']:.4f}")
    if histograms:
        for name, m in metrics.items():
            draw_histogram(f"{histograms}_{name}.png", name, ins[name], outs[name], names, m)
    if json_out:
        text = json.dumps({"in": {"name": names[0], "table": inside, "images": len(next(iter(ins.values())))},
                           "ood": {"name": names[1], "table": outside, "images": len(next(iter(outs.values())))},
                           "scores": metrics}, indent=2)
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    click.echo("\n".join(lines))
