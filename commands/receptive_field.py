"""``vqprior receptive-field``: draw which input positions one output position of a PixelSNAIL depends on.

The gradient magnitude of one position's output with respect to the input (the paper's Figures 6-9), from a
checkpoint or a randomly initialised preset; ``--compare`` draws the same preset without attention beside it, which
shows the blind spots of the convolution-only stack. The tensor work lives in ``vqprior.models.receptive_field``.
"""
from __future__ import annotations

from pathlib import Path

import click

from vqprior.commands.common import guarded, refuse_unused


def parse_position(text: str | None, height: int, width: int) -> tuple[int, int]:
    """``"R,C"`` -> (R, C) inside a height x width map; ``None`` -> the centre."""
    if text is None:
        return height // 2, width // 2
    parts = text.split(",")
    try:
        r, c = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        r = c = None
    if r is None:
        raise click.BadParameter(f"expected R,C (two integers, e.g. 8,8), got {text!r}", param_hint="--position")
    if not (0 <= r < height and 0 <= c < width):
        raise click.BadParameter(f"({r}, {c}) is outside the {height}x{width} map: rows 0..{height - 1}, "
                                 f"columns 0..{width - 1}", param_hint="--position")
    return r, c


def _build_preset_model(preset: str, size: int, head: str, num_codes: int, attention: bool, seed: int):
    import torch

    from vqprior.config import model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL

    config = model_config_from_preset(preset, height=size, width=size, head=head, attention=attention,
                                      num_codes=num_codes if head == "codes" else None)
    torch.manual_seed(seed)  # the same seed for both models of a comparison
    return PixelSNAIL(config)


@click.command("receptive-field")
@click.argument("checkpoint", metavar="[CKPT]", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", default=None, help="Random-init model from this preset (instead of CKPT).")
@click.option("--no-attention", is_flag=True, help="With --preset: the same network without attention.")
@click.option("--size", type=click.IntRange(min=2), default=None,
              help="Map size (default 16 for --preset, the checkpoint's own size for CKPT).")
@click.option("--head", type=click.Choice(["pixels", "codes"]), default="pixels", show_default=True,
              help="With --preset: model images or VQ-VAE codes.")
@click.option("--num-codes", type=click.IntRange(min=2), default=512, show_default=True,
              help="With --preset --head codes: codebook size.")
@click.option("--position", default=None, help="Output position R,C (row, column; default: the centre).")
@click.option("--compare", is_flag=True, help="With --preset: draw the model without attention beside it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Image to write; the format follows the suffix (.png, .jpg, .webp, ...).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random weights and input.")
@guarded
def receptive_field(checkpoint, preset, no_attention, size, head, num_codes, position, compare, out, seed):
    """Heat map of |d output(R,C) / d input| for CKPT or a random-init --preset (black = blind spot)."""
    import torch

    from vqprior.images import image_format, save_image
    from vqprior.models.receptive_field import (
        combine_panels,
        compute_receptive_field,
        render_receptive_field,
        summarize_receptive_field,
    )

    image_format(out)  # an unknown suffix fails before the work
    if (checkpoint is None) == (preset is None):
        raise click.UsageError("give either a checkpoint CKPT or --preset NAME (exactly one)")
    if checkpoint is not None:
        for flag, used in (("--no-attention", no_attention), ("--compare", compare),
                           ("--head", head != "pixels")):
            if used:
                raise click.UsageError(f"{flag} applies to --preset only (a checkpoint fixes its own network)")
    if checkpoint is not None or head != "codes":
        refuse_unused(("num_codes",), "without --preset ... --head codes (a checkpoint has its own codebook)")
    if compare and no_attention:
        raise click.UsageError("--compare already draws the model without attention; drop --no-attention")

    if checkpoint is not None:
        from vqprior.checkpoint import load_model

        model = load_model(checkpoint, kind=("pixels", "prior"))
        height, width = (size, size) if size else (model.config.height, model.config.width)
        models = [(Path(checkpoint).name, model)]
    else:
        height = width = size or 16
        model = _build_preset_model(preset, height, head, num_codes, not no_attention, seed)
        label = " without attention" if no_attention else " with attention" if compare else ""
        models = [(preset + label, model)]
        if compare:
            models.append((f"{preset} without attention",
                           _build_preset_model(preset, height, head, num_codes, False, seed)))
    where = parse_position(position, height, width)

    panels = []
    for name, net in models:
        grad_map = compute_receptive_field(net, where, height, width, torch.Generator().manual_seed(seed))
        summary = summarize_receptive_field(grad_map, where)
        click.echo(f"{name}: position {where[0]},{where[1]}: {summary.earlier_reached} of {summary.earlier} earlier "
                   f"positions reach the output ({summary.blind} blind)"
                   + (f"; {summary.later_reached} later positions do (not causal!)" if summary.later_reached else ""))
        panels.append((name, render_receptive_field(grad_map, where)))
    image = combine_panels(panels) if len(panels) > 1 else panels[0][1]
    save_image(image, out)
    click.echo(f"wrote {out}")
