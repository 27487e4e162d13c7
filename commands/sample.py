"""``vqprior sample``: sample images from a pixel model or from code priors (decoded by the embedded VQ-VAE)."""
from __future__ import annotations

import click

from .common import apply_precision, check_outputs, device_option, guarded, precision_option, resolve_device


def sampling_options(fn):
    opts = [
        click.option("--num", type=click.IntRange(min=1), default=16, show_default=True, help="How many samples."),
        click.option("--out", type=click.Path(dir_okay=False), required=True, help="PNG grid to write."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Priors: keep the K most likely codes (0: off)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Priors: nucleus sampling mass (1: off)."),
        click.option("--class", "label", type=int, default=None,
                     help="Class label (class-conditional models; default: cycle through classes)."),
        click.option("--method", type=click.Choice(["cached", "naive"]), default="cached", show_default=True,
                     help="cached = exact incremental sampler; naive = one full forward pass per position."),
        click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per grid row."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Samples drawn together (default: all --num at once)."),
        click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True,
                     help="Upscale the PNG by this integer factor."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command("sample")
@click.argument("checkpoint", type=click.Path())
@click.option("--bottom", type=click.Path(), default=None, help="Bottom prior of a 2-level VQ-VAE.")
@sampling_options
@click.option("--save-codes", type=click.Path(dir_okay=False), default=None,
              help="Priors: write the sampled codes (.npy; .npz with top/bottom for 2 levels).")
@click.option("--save-array", type=click.Path(dir_okay=False), default=None,
              help="Write the sampled images as a uint8 (N, C, H, W) .npy array.")
@click.option("--animate", type=click.Path(dir_okay=False), default=None,
              help="Also write a GIF of the samples filling in position by position.")
@precision_option(sampling=True)
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar (shown over the positions to sample on a terminal).")
@guarded
def sample(checkpoint, bottom, num, out, seed, temperature, top_k, top_p, label, method, nrow, batch_size, scale,
           save_codes, save_array, animate, device,
           precision, quiet):
    """Sample a PNG grid from CHECKPOINT (a pixel model or a code prior)."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.generate import generate
    from vqprior.images import save_gif, save_grid

    from .arrays import save_codes_file, save_npy

    device = resolve_device(device)
    apply_precision(precision)
    check_outputs(out, save_codes, save_array, animate)
    model = load_model(checkpoint, device, kind=("pixels", "prior"))
    bottom_model = load_model(bottom, device, kind="prior") if bottom else None
    if save_codes and model.config.head == "pixels":
        raise click.UsageError("--save-codes applies to code priors; use --save-array for pixel models")
    generator = torch.Generator(device=device).manual_seed(seed)
    result = generate(model, num, bottom=bottom_model, method=method, generator=generator, temperature=temperature,
                      top_k=top_k, top_p=top_p, label=label, animate=bool(animate), batch_size=batch_size,
                      precision=precision,
                      progress=False if quiet else None)
    save_grid(result.images, out, nrow=nrow, scale=scale)
    if save_codes:
        save_codes_file(save_codes, result.codes)
    if save_array:
        save_npy(save_array, result.images.cpu().numpy())
    if animate:
        save_gif(result.frames + [result.frames[-1]] if result.frames else [], animate, scale=scale)
    click.echo(f"wrote {num} samples to {out}" + (f", animation to {animate}" if animate else ""))
