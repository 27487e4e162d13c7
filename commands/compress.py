"""``vqprior compress`` / ``vqprior decompress``: lossless files coded with a model's exact conditionals.

Pixel models code images (a PNG, a folder of PNGs, a uint8 (N, C, H, W) .npy). Code priors code VQ-VAE code maps
(an LMDB code cache, .npy / .npz codes), or images first encoded by the prior's VQ-VAE: a lossy image codec whose
bits per pixel are printed with the reconstruction's PSNR.
"""
from __future__ import annotations

from pathlib import Path

import click

from vqprior.commands.common import (
    apply_precision,
    check_outputs,
    device_option,
    guarded,
    middle_option,
    resolve_device,
)


def _load(checkpoint, bottom, device, middle=()):
    from vqprior.checkpoint import load_model
    from vqprior.sampling.generate import prior_chain, prior_level, vqvae_levels

    model = load_model(checkpoint, device, kind=("pixels", "prior"))
    if model.config.head == "pixels":
        if bottom:
            raise click.UsageError("--bottom applies to code priors, not to pixel models")
        if middle:
            raise click.UsageError("--middle applies to code priors, not to pixel models")
        return model, [model]
    if prior_level(model) == "bottom":
        raise click.UsageError("this is a bottom prior: give the top prior as CKPT and this one with --bottom")
    priors = [model]
    if bottom:
        priors.append(load_model(bottom, device, kind="prior"))
        if prior_level(priors[1]) != "bottom":
            raise click.UsageError("the --bottom checkpoint is not a bottom prior")
        if getattr(priors[1], "vqvae_sha256", "") != getattr(model, "vqvae_sha256", ""):
            raise click.ClickException("the top and bottom priors were trained on codes of different VQ-VAEs")
    if middle or vqvae_levels(model) >= 3:  # one prior per level, each checked against the hierarchy
        return model, prior_chain(model, priors[1] if bottom else None,
                                  [load_model(path, device, kind="prior") for path in middle])
    if vqvae_levels(model) == 2 and not bottom:
        raise click.UsageError("this top prior belongs to a 2-level VQ-VAE: pass its bottom prior with --bottom")
    return model, priors


def _read_codes(path: Path, priors, channels: int):
    """(code maps [top(, middle...)(, bottom)], the source images or None) from an LMDB cache, .npy/.npz codes or
    images."""
    import numpy as np
    import torch

    from vqprior.commands.arrays import load_codes_file
    from vqprior.compress.files import as_images, load_npy, read_images
    from vqprior.errors import UserError

    if path.is_dir() and (path / "data.mdb").exists():
        from vqprior.data.codes import CodeDataset

        ds = CodeDataset(path)
        if ds.levels != len(priors):
            raise UserError(f"{path} holds {ds.levels} code level(s) but {len(priors)} prior(s) were given")
        items = [ds[i] for i in range(len(ds))]
        return [torch.stack([it[n] for it in items]) for n in ds.level_names], None
    if path.suffix.lower() in (".npz", ".npy") and path.exists() and not path.is_dir():
        array = load_npy(path) if path.suffix.lower() == ".npy" else None
        if array is not None and array.ndim == 4:  # images, to be encoded by the VQ-VAE
            images = as_images(array, channels, str(path))
        else:
            return [torch.from_numpy(a.astype(np.int64)) for a in load_codes_file(path)], None
    else:
        images, _ = read_images(path, channels)
    vq = getattr(priors[0], "vqvae", None)
    if vq is None:
        raise UserError("this prior carries no VQ-VAE to encode images with")
    device = next(vq.parameters()).device
    codes = [torch.cat(level) for level in zip(*(vq.encode(images[i:i + 64].to(device))
                                                for i in range(0, images.shape[0], 64)))]
    return [c.cpu() for c in codes], images


def _psnr(vq, codes, images) -> float:
    from vqprior.evaluation.metrics import psnr_from_mse

    n, se = images.shape[0], 0.0
    for i in range(0, n, 64):
        recon = vq.decode([c[i:i + 64] for c in codes]).cpu()
        se += float(((recon.double() - images[i:i + 64].double()) ** 2).sum())
    return psnr_from_mse(se / images.numel())


def _image_pixels(priors, codes) -> int | None:
    vq = getattr(priors[0], "vqvae", None)
    if vq is None:
        return None
    return codes[-1].shape[0] * codes[-1].shape[1] * codes[-1].shape[2] * vq.config.bottom_stride ** 2


@click.command("compress")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The compressed file to write.")
@click.option("--bottom", type=click.Path(), default=None, help="Bottom prior of a 2-level (or deeper) VQ-VAE.")
@middle_option
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Items coded together in one cached pass (decoding uses the same, from the file).")
@device_option
@guarded
def compress(checkpoint, input_path, out, bottom, middle, batch_size, device):
    """Compress INPUT losslessly with CKPT's exact conditionals.

    \b
    Pixel models: INPUT is a PNG, a folder of PNGs or a uint8 (N, C, H, W) .npy.
    Code priors: an LMDB code cache, .npy/.npz codes (as `sample --save-codes` writes), or images, which the
    prior's VQ-VAE encodes first (lossy: the PSNR of the reconstruction is printed).
    """
    from vqprior.compress import compress_codes, compress_images
    from vqprior.compress.files import read_images
    from vqprior.io import atomic_write

    device = resolve_device(device)
    apply_precision("fp32")  # exact float32 (TF32 off): codes and coding tables must not depend on the GPU
    check_outputs(out)
    model, priors = _load(checkpoint, bottom, device, middle)
    path = Path(input_path)
    if model.config.head == "pixels":
        images, names = read_images(path, model.config.channels)
        data, st = compress_images(model, images, chunk=batch_size, names=names)
        what = f"{images.shape[0]} image(s) {'x'.join(map(str, images.shape[1:]))}"
        rate = f"{st['bits_per_value']:.4f} bits/dim (the model's -log2 p: {st['model_bits_per_value']:.4f})"
    else:
        vq = getattr(model, "vqvae", None)
        codes, images = _read_codes(path, priors, vq.config.channels if vq is not None else 3)
        data, st = compress_codes(priors, codes, chunk=batch_size)
        what = f"{codes[0].shape[0]} code map(s) " + " + ".join(f"{c.shape[1]}x{c.shape[2]}" for c in codes)
        rate = f"{st['bits_per_value']:.4f} bits/code (the model's -log2 p: {st['model_bits_per_value']:.4f})"
        pixels = _image_pixels(priors, codes)
        if pixels:
            rate += f", {8 * st['file_bytes'] / pixels:.4f} bits/pixel"
        if images is not None:
            rate += f", reconstruction PSNR {_psnr(vq, codes, images):.2f} dB"
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    click.echo(f"compressed {what} to {out}: {st['file_bytes']} bytes ({st['header_bytes']} header) = {rate}")


@click.command("decompress")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--out", type=click.Path(), required=True,
              help="Pixels: a .png (one image), a .npy or a folder. Codes: .npy/.npz codes, or a .png / folder "
                   "of the images the VQ-VAE decodes.")
@click.option("--bottom", type=click.Path(), default=None, help="Bottom prior of a 2-level (or deeper) VQ-VAE.")
@middle_option
@device_option
@guarded
def decompress(checkpoint, file, out, bottom, middle, device):
    """Decompress FILE (from `vqprior compress`) with the same CKPT; refused with another model, a damaged
    file, or when the decoded data do not match the stored checksum."""
    from vqprior.commands.arrays import save_codes_file
    from vqprior.compress import decompress_codes, decompress_images
    from vqprior.compress.files import check_image_output, write_images
    from vqprior.errors import UserError

    device = resolve_device(device)
    apply_precision("fp32")  # exact float32 (TF32 off): codes and coding tables must not depend on the GPU
    check_image_output(out)
    model, priors = _load(checkpoint, bottom, device, middle)
    path = Path(file)
    if not path.is_file():
        raise UserError(f"compressed file not found: {path}" if not path.exists() else f"not a file: {path}")
    data = path.read_bytes()
    suffix = Path(out).suffix.lower()
    if model.config.head == "pixels":
        if suffix == ".npz":
            raise click.UsageError("--out .npz is for code maps; write images as .png, .npy or a folder")
        images, names = decompress_images(model, data, where=str(path))
        click.echo(f"decompressed {write_images(out, images, names)} to {out}")
        return
    codes = decompress_codes(priors, data, where=str(path))
    if suffix in (".npy", ".npz"):
        if (suffix == ".npy") != (len(codes) == 1):
            raise click.UsageError("one code level is written as .npy, two levels as .npz (arrays top and bottom)"
                                   if len(codes) <= 2 else
                                   f"{len(codes)} code levels are written as .npz (one array per level)")
        save_codes_file(out, codes)
        click.echo(f"decompressed {codes[0].shape[0]} code map(s) to {out}")
        return
    vq = getattr(model, "vqvae", None)
    if vq is None:
        raise UserError("this prior carries no VQ-VAE to decode images with; write .npy/.npz codes instead")
    images = [vq.decode([c[i:i + 64].to(device) for c in codes]).cpu() for i in range(0, codes[0].shape[0], 64)]
    import torch

    click.echo(f"decoded {write_images(out, torch.cat(images))} (VQ-VAE reconstructions) to {out}")
