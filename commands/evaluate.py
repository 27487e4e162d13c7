"""``vqprior evaluate``: held-out bits/dim of a pixel model, bits/code of a code prior, or the reconstruction
MSE / PSNR and per-level codebook usage and perplexity of a VQ-VAE."""
from __future__ import annotations

import click

from vqprior.commands.common import (
    apply_precision,
    cache_encoding_options,
    check_dataset_options,
    deterministic_option,
    device_option,
    download_option,
    guarded,
    load_checkpoint_split,
    precision_option,
    refuse_unused,
    resolve_device,
)
from vqprior.commands.options import DATASETS


@click.command("evaluate")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Pixel models and VQ-VAEs: dataset to score (default: the one it was trained on).")
@click.option("--data-dir", type=click.Path(), default=None, help="Dataset folder (default: the training one).")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--codes", type=click.Path(), default=None, help="Priors: an LMDB code cache to score.")
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Score only the first N items (0: all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--marginal", is_flag=True,
              help="Class-conditional models: score -log2 p(x) = -log2 sum_y p(y) p(x|y), p(y) uniform (one pass "
                   "per class), instead of -log2 p(x|label): the model as an unconditional density.")
@click.option("--class", "class_", type=click.Choice(["label", "none"]), default=None,
              help="Class-conditional models: score given each item's own label (label, the default), or given "
                   "the null class (none: the unconditional p(x) of a model trained with --class-dropout, one pass).")
@download_option
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="LMDB image cache folder.")
@cache_encoding_options
@precision_option()
@device_option
@deterministic_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@guarded
def evaluate(checkpoint, dataset, data_dir, split, codes, limit, batch_size, marginal, class_, download, cache,
             cache_encoding, jpeg_quality, precision, device, quiet):
    """Print the negative log-likelihood of a split in bits/dim (pixels) or bits/code (priors), EMA weights (the
    likelihood itself is float32 under --precision bf16); for a VQ-VAE, the reconstruction MSE (0..255 scale) and
    PSNR, and codebook usage and perplexity per level."""
    from torch.utils.data import DataLoader

    from vqprior.checkpoint import load_model, read_checkpoint
    from vqprior.config import DataConfig
    from vqprior.evaluation.likelihood import ClassMarginal, NullClass, evaluate_nll
    from vqprior.models.null_class import null_label
    from vqprior.runtime.precision import autocast

    device = resolve_device(device)
    apply_precision(precision, device)
    stored = read_checkpoint(checkpoint, ("pixels", "prior", "vqvae"))
    kind, data = stored["kind"], DataConfig.from_dict(stored["config"]["data"])
    model = load_model(checkpoint, device)
    if marginal and (kind == "vqvae" or not model.config.num_classes):
        raise click.UsageError("--marginal is for class-conditional pixel models and priors; this "
                               f"{'VQ-VAE' if kind == 'vqvae' else 'model'} has no classes")
    if class_ and (kind == "vqvae" or not model.config.num_classes):
        raise click.UsageError(f"--class {class_} is for class-conditional pixel models and priors; this "
                               f"{'VQ-VAE' if kind == 'vqvae' else 'model'} has no classes")
    if class_ and marginal:
        raise click.UsageError(f"--marginal sums over the classes and --class {class_} scores one: pass one of them")
    if class_ == "none":
        null_label(model.config, "--class none")
    if kind == "prior":
        refuse_unused(("dataset", "data_dir", "split", "download", "cache", "cache_encoding", "jpeg_quality"),
                      "for a prior (it is scored on the --codes cache)")
    else:
        check_dataset_options(dataset or data.dataset)
    if kind == "vqvae":
        if codes:
            raise click.UsageError("--codes is for priors; a VQ-VAE is evaluated on images (--dataset)")
        with autocast(device, precision):
            ds = load_checkpoint_split(data, dataset, data_dir, split, limit, cache, cache_encoding, jpeg_quality,
                                       download)
            _evaluate_vqvae(model, data, ds, f"{dataset or data.dataset} {split}", batch_size, quiet)
        return
    scored, labelled = (ClassMarginal(model), False) if marginal else (model, bool(model.config.num_classes))
    how = f" (marginal over {model.config.num_classes} classes, p(y) uniform)" if marginal else ""
    if class_ == "none":
        scored, labelled, how = NullClass(model), False, " (the null class: the unconditional p(x))"
    if kind == "pixels":
        if codes:
            raise click.UsageError("--codes is for priors; this is a pixel model")
        ds = load_checkpoint_split(data, dataset, data_dir, split, limit, cache, cache_encoding, jpeg_quality,
                                       download)
        if (ds.channels, ds.height, ds.width) != (model.config.channels, model.config.height, model.config.width):
            raise click.ClickException(
                f"dataset images are {ds.channels}x{ds.height}x{ds.width} but the model was trained on "
                f"{model.config.channels}x{model.config.height}x{model.config.width}")
        with autocast(device, precision):
            result = evaluate_nll(scored, DataLoader(ds, batch_size=batch_size), device, key="image",
                                  use_label=labelled, limit=limit, progress=not quiet)
        unit, where = "bits/dim", f"{dataset or data.dataset} {split}"
    else:
        if not codes:
            raise click.UsageError("evaluating a prior needs --codes CODES.lmdb")
        from vqprior.data.codes import CodeDataset, check_codebook
        from vqprior.levels import level_above, prior_levels

        level = model.prior_info.get("level", "top")
        ds = CodeDataset(codes)
        check_codebook(ds.metadata, model.config.num_codes, level)
        cond = level_above(ds.level_names, level)  # the bottom prior of 2 levels: the top codes
        if cond is not None and prior_levels(model.prior_info, level) != ds.levels:
            raise click.ClickException(f"this {level} prior belongs to a {prior_levels(model.prior_info, level)}-"
                                       f"level VQ-VAE but {codes} holds {ds.levels} levels")
        with autocast(device, precision):
            result = evaluate_nll(scored, DataLoader(ds, batch_size=batch_size), device, key=level,
                                  condition_key=cond, use_label=labelled, limit=limit, progress=not quiet)
        unit, where = "bits/code", f"{codes} ({level} codes)"
    click.echo(f"{result['bits_per_value']:.4f} {unit} on {where}{how}: {result['examples']} items, "
               f"{result['nll_nats']:.1f} nats total")


def _evaluate_vqvae(model, data, ds, what: str, batch_size, quiet) -> None:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from vqprior.training.vqvae_task import VQVAETask

    if ds.channels != model.config.channels:
        raise click.ClickException(f"dataset images have {ds.channels} channel(s) but the VQ-VAE was trained on "
                                   f"{model.config.channels}")
    stride = model.config.total_stride
    if ds.height % stride or ds.width % stride:
        raise click.ClickException(f"dataset images of {ds.height}x{ds.width} are not divisible by the VQ-VAE's "
                                   f"total stride {stride}")
    loader = tqdm(DataLoader(ds, batch_size=batch_size), disable=quiet, desc="evaluate", unit="batch",
                  dynamic_ncols=True)
    m = VQVAETask(model.config, data).evaluate(model, loader)
    levels = "; ".join(f"{level}: usage {m[f'usage_{level}']:.1%}, perplexity {m[f'perplexity_{level}']:.1f} of "
                       f"{model.config.codebook_size}" for level in model.level_names)
    click.echo(f"MSE {m['mse']:.2f} (0..255 scale), PSNR {m['psnr']:.2f} dB on {what}: {len(ds)} images; "
               f"{levels}")
