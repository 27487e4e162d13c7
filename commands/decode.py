"""``vqprior decode``: decode saved code maps (.npy / .npz from ``sample --save-codes``) with a VQ-VAE."""
from __future__ import annotations

import click

from .common import check_outputs, device_option, guarded, resolve_device


@click.command("decode")
@click.argument("vqvae_path", metavar="VQVAE.pt", type=click.Path())
@click.argument("codes_path", metavar="CODES", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG grid to write.")
@click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per grid row.")
@click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True)
@device_option
@guarded
def decode(vqvae_path, codes_path, out, nrow, scale, device):
    """Decode CODES (int (N, H, W) .npy for one level; .npz with top/bottom for two) into a PNG grid.

    VQVAE.pt may be a VQ-VAE checkpoint or a prior checkpoint (its embedded VQ-VAE is used)."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.images import save_grid

    from .arrays import load_codes_file
    
    device = resolve_device(device)
    check_outputs(out)
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
