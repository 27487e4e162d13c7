"""``vqprior extract-codes``: encode a dataset split with a VQ-VAE into an LMDB code cache."""
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
    removes_new_folder_on_error,
    resolve_device,
)
from vqprior.commands.options import DATASETS


@click.command("extract-codes")
@click.option("--vqvae", "vqvae_path", type=click.Path(), required=True, help="A train-vqvae checkpoint.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Dataset to encode (default: the one the VQ-VAE was trained on).")
@click.option("--data-dir", type=click.Path(), default=None, help="Dataset folder (default: the VQ-VAE's).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--out", type=click.Path(), required=True,
              help="The LMDB code cache folder to write (created with missing parents).")
@click.option("--overwrite", is_flag=True, help="Replace a finished cache at --out.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="Encode only the first N images (0: all).")
@download_option
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="LMDB image cache folder.")
@cache_encoding_options
@device_option
@deterministic_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@guarded
@removes_new_folder_on_error("out", discard=lambda folder: True)  # a failed extraction is rebuilt from scratch
def extract_codes(vqvae_path, dataset, data_dir, split, out, overwrite, batch_size, limit, download, cache,
                  cache_encoding, jpeg_quality, device, quiet):
    """Encode every image of a split into VQ-VAE codes (uint16 per level + label + source index per record).

    The cache is marked complete only at the very end: an interrupted run is never taken as finished, and
    re-running the command rebuilds it.
    """
    from pathlib import Path

    from vqprior.checkpoint import load_model, read_checkpoint
    from vqprior.config import DataConfig
    from vqprior.data.codes import extract_codes as extract
    from vqprior.io import file_sha256

    device = resolve_device(device)
    apply_precision("fp32")  # exact float32 (TF32 off): codes and coding tables must not depend on the GPU
    data = DataConfig.from_dict(read_checkpoint(vqvae_path, "vqvae")["config"]["data"])
    model = load_model(vqvae_path, device, kind="vqvae")
    name = dataset or data.dataset
    check_dataset_options(name)
    ds = load_checkpoint_split(data, dataset, data_dir, split, limit, cache, cache_encoding, jpeg_quality,
                               download)
    meta = extract(model, ds, out, file_sha256(vqvae_path), name, split, batch_size=batch_size, device=device,
                   overwrite=overwrite, progress=not quiet, vqvae_path=str(Path(vqvae_path).resolve()))
    shapes = " + ".join(f"{n} {h}x{w}" for n, (h, w) in zip(meta["level_names"], meta["shapes"]))
    click.echo(f"wrote {meta['count']} code maps ({shapes}, {meta['codebook_sizes'][0]} codes) to {out}")
