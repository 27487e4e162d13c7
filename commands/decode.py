"""``vqprior decode``: decode saved code maps (.npy / .npz from ``sample --save-codes``) with a VQ-VAE of any
number of levels."""
from __future__ import annotations

import click

from vqprior.commands.common import apply_precision, check_outputs, device_option, guarded, resolve_device


@click.command("decode")
@click.argument("codes_path", metavar="CODES", type=click.Path())
@click.option("--vqvae", "vqvae_path", type=click.Path(), required=True,
              help="The VQ-VAE checkpoint, or a prior that embeds it (as for extract-codes).")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Image grid to write; the format follows the suffix (.png, .jpg, .webp, ...).")
@click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per grid row.")
@click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True)
@device_option
@guarded
def decode(codes_path, vqvae_path, out, nrow, scale, device):
    """Decode CODES (int (N, H, W) .npy for one level; .npz with top/bottom for two, top/middle/bottom for three,
    one array per level for more) into an image grid:
    `vqprior decode --vqvae VQVAE.pt CODES --out grid.png`.

    --vqvae may name a VQ-VAE checkpoint or a prior checkpoint (its embedded VQ-VAE is used)."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.commands.arrays import load_codes_file
    from vqprior.images import image_format, save_grid

    device = resolve_device(device)
    apply_precision("fp32")  # exact float32 (TF32 off): codes and coding tables must not depend on the GPU
    check_outputs(out)
    image_format(out)
    model = load_model(vqvae_path, device, kind=("vqvae", "prior"))
    vq = model if getattr(model, "checkpoint_kind", "") == "vqvae" else getattr(model, "vqvae", None)
    if vq is None:
        raise click.ClickException(f"{vqvae_path} carries no VQ-VAE")
    arrays = load_codes_file(codes_path)
    if len(arrays) != vq.config.levels:
        raise click.ClickException(f"the VQ-VAE has {vq.config.levels} level(s) but {codes_path} holds "
                                   f"{len(arrays)} code map(s)")
    codes = [torch.from_numpy(a.astype("int64")).to(device) for a in arrays]
    with torch.no_grad():
        images = vq.decode(codes)
    save_grid(images, out, nrow=nrow, scale=scale)
    click.echo(f"decoded {images.shape[0]} code maps to {out}")
