"""``vqprior sample``: sample images from a pixel model or from code priors (decoded by the embedded VQ-VAE)."""
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
    removes_new_folder_on_error,
    resolve_device,
)

guidance_option = click.option(
    "--guidance", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="W",
    help="Classifier-free guidance scale (models trained with --class-dropout): draw from p(x|y)^(1+W) / p(x)^W, "
         "normalised at every position; 0: off. See docs/guidance.md.")


def guidance_checks(guidance: float, model, bottom_model, middle_models=()) -> None:
    """--guidance needs a model with a null class (one line before sampling); say on stderr when it guides only
    some priors of a hierarchy (a lower prior has classes but no null class)."""
    from vqprior.models.null_class import null_label
    from vqprior.sampling.generate import guided_levels, prior_level

    if guidance:
        null_label(model.config, f"--guidance {guidance:g}")
    lower = [(prior_level(p), p) for p in middle_models] + ([("bottom", bottom_model)] if bottom_model else [])
    unguided = [name for name, p in lower if p.config.num_classes and not p.config.null_class]
    if guidance and unguided:
        priors = " and ".join(f"the {name} prior" for name in unguided)
        guided = " and ".join(guided_levels(bottom_model, middle_models))
        one = len(unguided) == 1
        click.echo(f"--guidance {guidance:g} guides {guided} only: {priors} {'has' if one else 'have'} no null class "
                   f"and {'is' if one else 'are'} sampled given the class, unguided.", err=True)


def load_lower_priors(bottom, middle, device) -> tuple:
    """(the --bottom prior or None, the --middle priors) loaded for sampling."""
    from vqprior.checkpoint import load_model

    return (load_model(bottom, device, kind="prior") if bottom else None,
            [load_model(path, device, kind="prior") for path in middle])


def sampling_options(fn):
    opts = [
        click.option("--num", type=click.IntRange(min=1), default=16, show_default=True, help="How many samples."),
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help="Image grid to write; the format follows the suffix (.png, .jpg, .webp, ...)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Priors: keep the K most likely codes (0: off)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Priors: nucleus sampling mass (1: off)."),
        click.option("--class", "label", type=int, default=None,
                     help="Class label (class-conditional models; default: cycle through classes)."),
        guidance_option,
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
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--bottom", type=click.Path(), default=None, help="Bottom prior of a 2-level (or deeper) VQ-VAE.")
@middle_option
@sampling_options
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder to write one PNG per sample into (0000.png, 0001.png, ...); created if missing.")
@click.option("--overwrite", is_flag=True, help="Let --out-dir write into a folder that holds files already.")
@click.option("--class-rows", is_flag=True,
              help="Class-conditional models: lay the --out grid out with one row per class (--num a multiple of "
                   "the number of classes).")
@click.option("--save-codes", type=click.Path(dir_okay=False), default=None,
              help="Priors: write the sampled codes (.npy; .npz with an array per level, top/bottom for 2 levels).")
@click.option("--save-array", type=click.Path(dir_okay=False), default=None,
              help="Write the sampled images as a uint8 (N, C, H, W) .npy array.")
@click.option("--animate", type=click.Path(dir_okay=False), default=None,
              help="Also write an animation of the samples filling in position by position (.gif, or an animated "
                   ".png / .webp).")
@compile_sampler_option
@precision_option(sampling=True)
@device_option
@deterministic_option
@click.option("--quiet", is_flag=True, help="No progress bar (shown over the positions to sample on a terminal).")
@guarded
@removes_new_folder_on_error("out_dir", discard=lambda folder: True)  # a failed command leaves no --out-dir
def sample(checkpoint, bottom, middle, num, out, seed, temperature, top_k, top_p, label, guidance, method, nrow,
           batch_size, scale, out_dir, overwrite, class_rows, save_codes, save_array, animate, compile_step, device,
           precision, quiet):
    """Sample from CKPT (a pixel model or a code prior): an image grid (--out), one PNG per sample (--out-dir),
    the uint8 array (--save-array) and/or the codes (--save-codes); at least one of them."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.commands.arrays import save_codes_file, save_npy
    from vqprior.images import check_image_folder, image_format, save_animation, save_grid, save_image_folder
    from vqprior.sampling.generate import generate

    if not any((out, out_dir, save_array, save_codes)):
        raise click.UsageError("nothing to write: give --out, --out-dir, --save-array and/or --save-codes")
    if not out:
        refuse_unused(("nrow", "class_rows"), "without --out (they lay out the grid)")
    if not (out or out_dir or animate):
        refuse_unused(("scale",), "without --out, --out-dir or --animate (it enlarges images)")
    if not out_dir:
        refuse_unused(("overwrite",), "without --out-dir (single files are always replaced atomically)")
    device = resolve_device(device)
    check_compile_sampler(compile_step, method, device)
    apply_precision(precision, device)
    check_outputs(out, save_codes, save_array, animate)
    if out:
        image_format(out)
    if animate:
        image_format(animate, animated=True)
    if out_dir:
        check_image_folder(out_dir, overwrite)
    model = load_model(checkpoint, device, kind=("pixels", "prior"))
    bottom_model, middle_models = load_lower_priors(bottom, middle, device)
    if model.config.head == "pixels":
        if save_codes:
            raise click.UsageError("--save-codes applies to code priors; use --save-array for pixel models")
        refuse_unused(("top_k", "top_p"), "for a pixel model (they filter the categorical code distributions of "
                                          "priors)")
    if class_rows:
        nrow = _class_rows_nrow(model, num, label, nrow)
    generator = torch.Generator(device=device).manual_seed(seed)
    guidance_checks(guidance, model, bottom_model, middle_models)
    result = generate(model, num, bottom=bottom_model, middle=middle_models, method=method, generator=generator,
                      temperature=temperature, top_k=top_k, top_p=top_p, label=label, animate=bool(animate),
                      batch_size=batch_size, precision=precision, progress=False if quiet else None,
                      compile=compile_step, guidance=guidance)
    written = []
    if out:
        # Samples cycle through the classes (sample i has class i % classes); --class-rows groups them by class.
        grid = result.images[torch.arange(num).remainder(model.config.num_classes).argsort(stable=True)] \
            if class_rows else result.images
        save_grid(grid, out, nrow=nrow, scale=scale)
        written.append(f"a grid {out}")
    if out_dir:
        save_image_folder(result.images, out_dir, scale=scale, overwrite=overwrite)
        written.append(f"one PNG each in {out_dir}")
    if save_codes:
        save_codes_file(save_codes, result.codes)
        written.append(f"codes {save_codes}")
    if save_array:
        save_npy(save_array, result.images.cpu().numpy())
        written.append(f"the array {save_array}")
    if animate:
        save_animation(result.frames + [result.frames[-1]] if result.frames else [], animate, scale=scale)
        written.append(f"an animation {animate}")
    click.echo(f"wrote {num} samples: " + ", ".join(written))


def _class_rows_nrow(model, num: int, label, nrow) -> int:
    """Images per row for --class-rows, after checking that the option can do what it says."""
    classes = model.config.num_classes
    if not classes:
        raise click.UsageError("--class-rows applies to class-conditional models")
    if label is not None or nrow is not None:
        raise click.UsageError("--class-rows lays out every class itself: drop --class / --nrow")
    if num % classes:
        raise click.UsageError(f"--class-rows needs --num to be a multiple of the {classes} classes, got {num}")
    return num // classes
