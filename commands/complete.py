"""``vqprior complete``: keep the first rows of an image and sample the rest (pixels, or codes via the VQ-VAE)."""
from __future__ import annotations

import click

from vqprior.commands.common import (
    apply_precision,
    check_compile_sampler,
    check_outputs,
    compile_sampler_option,
    deterministic_option,
    device_option,
    guarded,
    middle_option,
    precision_option,
    refuse_unused,
    resolve_device,
)
from vqprior.commands.sample import guidance_checks, guidance_option, load_lower_priors


@click.command("complete")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--image", "image_path", type=click.Path(), required=True, help="The image to complete (any format).")
@click.option("--keep-rows", type=click.IntRange(min=0), required=True,
              help="Image rows to keep (raster prefix); the rest is sampled.")
@click.option("--bottom", type=click.Path(), default=None, help="Bottom prior of a 2-level (or deeper) VQ-VAE.")
@middle_option
@click.option("--num", type=click.IntRange(min=1), default=8, show_default=True, help="Completions to draw.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Image grid: original, masked input, then the completions (format from the suffix).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Priors: top-k (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Priors: nucleus mass (1: off).")
@click.option("--class", "label", type=int, default=None, help="Class label (class-conditional models).")
@guidance_option
@click.option("--method", type=click.Choice(["cached", "naive"]), default="cached", show_default=True)
@click.option("--scale", type=click.IntRange(1, 16), default=1, show_default=True)
@compile_sampler_option
@precision_option(sampling=True)
@device_option
@deterministic_option
@click.option("--quiet", is_flag=True, help="No progress bar (shown over the positions to sample on a terminal).")
@guarded
def complete(checkpoint, image_path, keep_rows, bottom, middle, num, out, seed, temperature, top_k, top_p, label,
             guidance, method, scale, compile_step, device, precision, quiet):
    """Complete the image: keep its first --keep-rows rows exactly and sample the rest, --num times.

    Pixel models condition on the exact raster prefix. Priors encode the image with their embedded VQ-VAE, keep
    the code rows lying entirely inside the kept region and sample the others, then decode; their "masked input"
    panel shows what they condition on: the kept codes decoded (grey where a level's codes are sampled).
    """
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.errors import UserError
    from vqprior.images import image_format, load_image, save_grid
    from vqprior.sampling.generate import encode_prefix, generate

    device = resolve_device(device)
    check_compile_sampler(compile_step, method, device)
    apply_precision(precision, device)
    check_outputs(out)
    image_format(out)
    model = load_model(checkpoint, device, kind=("pixels", "prior"))
    if model.config.head == "pixels":
        refuse_unused(("top_k", "top_p"), "for a pixel model (they filter the code distributions of priors)")
    bottom_model, middle_models = load_lower_priors(bottom, middle, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    c = model.config
    if c.head == "pixels":
        H, W = c.height, c.width
        image = load_image(image_path, c.channels, (H, W)).to(device)
        if keep_rows > H:
            raise UserError(f"--keep-rows must be at most the image height {H}, got {keep_rows}")
        prefix, start = image.unsqueeze(0).expand(num, -1, -1, -1), keep_rows * W
    else:
        vq = getattr(model, "vqvae", None)
        if vq is None:
            raise UserError("this prior checkpoint carries no VQ-VAE to encode the image with")
        stride = vq.config.total_stride  # the top prior's map: 1 level, bottom_stride; N levels, the coarsest
        H, W = c.height * stride, c.width * stride
        image = load_image(image_path, vq.config.channels, (H, W)).to(device)
        if keep_rows > H:
            raise UserError(f"--keep-rows must be at most the image height {H}, got {keep_rows}")
        encoded = encode_prefix(vq, image, keep_rows)  # the prior conditions on these codes, not on the pixels
        start, prefix = encoded.starts, [code.expand(num, -1, -1) for code in encoded.codes]
    guidance_checks(guidance, model, bottom_model, middle_models)
    result = generate(model, num, bottom=bottom_model, middle=middle_models, method=method, generator=generator,
                      temperature=temperature, top_k=top_k, top_p=top_p, label=label, prefix=prefix, start=start,
                      precision=precision, progress=False if quiet else None, compile=compile_step, guidance=guidance)
    original = image.unsqueeze(0).to(result.images.device)
    if original.shape[1] != result.images.shape[1]:
        original = original.expand(-1, result.images.shape[1], -1, -1)
    if c.head == "pixels":
        masked = original.clone()
        masked[:, :, keep_rows:] = 128  # the part to be sampled, greyed out
    else:
        masked = encoded.conditioned.to(original.device).expand(-1, original.shape[1], -1, -1)
    save_grid(torch.cat([original, masked, result.images]), out, nrow=num + 2, scale=scale)
    click.echo(f"wrote the original, the masked input and {num} completions to {out}")
