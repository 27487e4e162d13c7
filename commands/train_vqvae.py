"""``vqprior train-vqvae``: train a VQ-VAE of 1, 2 or more levels (EMA codebooks, commitment loss, dead-code
restarts)."""
from __future__ import annotations

import click

from vqprior.commands.common import (
    check_dataset_options,
    deterministic_option,
    device_option,
    guarded,
    refuse_unused,
    removes_new_folder_on_error,
    resolve_cache_encoding,
)
from vqprior.commands.options import data_options, train_config_from_options, train_options
from vqprior.commands.run_start import (
    DATA_FIXED,
    announce,
    architecture_conflicts,
    data_conflicts,
    refuse_on_resume,
    refuse_with_init,
    resumed_data_config,
    run_training,
    start_run,
)
from vqprior.config import VQVAE_PRESETS
from vqprior.levels import MAX_LEVELS

FIELDS = ("levels", "codebook_size", "embed_dim", "hidden", "res_blocks", "res_channels", "bottom_stride", "top_stride",
          "decay", "commitment")  # VQVAEConfig fields with an option; with --preset, fixed by a run or --init-from


@click.command("train-vqvae")
@data_options
@click.option("--levels", type=click.IntRange(1, MAX_LEVELS), default=None,
              help="1; 2 for a VQ-VAE-2 top/bottom hierarchy; 3 adds a middle level (top, middle, bottom), N > 3 "
                   "middle1 .. middle{N-2}, each level --top-stride coarser than the one below. [default: 2 for "
                   "--preset vqvae2-256, else 1]")
@click.option("--codebook-size", type=click.IntRange(2, 65536), default=None,
              help="Codes per codebook (default: preset).")
@click.option("--preset", type=click.Choice(list(VQVAE_PRESETS)), default="small", show_default=True,
              help="VQ-VAE architecture preset.")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None,
              help="Width of each codebook vector (not train-prior's --embed-dim, the prior's input embedding).")
@click.option("--hidden", type=click.IntRange(min=2), default=None, help="Encoder/decoder channels.")
@click.option("--res-blocks", type=click.IntRange(min=0), default=None,
              help="Residual blocks per encoder/decoder stack (not the PixelSNAIL --res-blocks of the other train "
                   "commands).")
@click.option("--res-channels", type=click.IntRange(min=1), default=None, help="Residual block bottleneck width.")
@click.option("--bottom-stride", type=int, default=None, help="Image pixels per bottom code, per side (power of 2).")
@click.option("--top-stride", type=int, default=None,
              help="Codes of a level per code of the level above, per side (power of 2); 2 levels: bottom codes per "
                   "top code.")
@click.option("--decay", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Codebook EMA decay. [default: 0.99]")
@click.option("--commitment", type=click.FloatRange(min=0), default=None, help="Commitment cost. [default: 0.25]")
@train_options(ema=0.0, lr=3e-4, lr_decay=1.0, batch_size=32, eval_every=500, sample_every=500)
@device_option
@deterministic_option
@click.pass_context
@guarded
@removes_new_folder_on_error("out_dir")
def train_vqvae(ctx, **kw):
    """Train a VQ-VAE; evaluates reconstruction MSE/PSNR and codebook usage/perplexity per level on the held-out
    split and writes reconstruction grids (originals above, reconstructions below).

    Weight EMA is off by default (--ema 0): the EMA codebooks follow the live encoder, not an averaged one.
    """
    from vqprior.commands.train_pixels import load_split
    from vqprior.config import DataConfig
    from vqprior.errors import UserError
    from vqprior.models.vqvae import VQVAEConfig, vqvae_config_from_preset
    from vqprior.training.vqvae_task import VQVAETask

    start = start_run(ctx, kw, "vqvae")  # rank 0 alone prints and writes
    device, echo, checkpoint = start.device, start.echo, start.checkpoint
    if checkpoint is not None:
        data_config = DataConfig.from_dict(checkpoint["config"]["data"])
        model_config = VQVAEConfig.from_dict(checkpoint["config"]["model"])
        refuse_on_resume(arch_conflicts(ctx, kw, model_config) + data_conflicts(ctx, kw, data_config), kw["out_dir"])
        data_config = resumed_data_config(ctx, kw, data_config)
    else:
        check_dataset_options(kw["dataset"], ctx)
        if start.init is not None:
            model_config = VQVAEConfig.from_dict(start.init["config"]["model"])
            refuse_with_init(arch_conflicts(ctx, kw, model_config), kw["init_from"])
        levels = (model_config.levels if start.init is not None
                  else kw["levels"] or VQVAE_PRESETS[kw["preset"]].get("levels", 1))
        if levels == 1:
            refuse_unused(("top_stride",), "with one level (--levels 2 adds the top level it spaces)", ctx)
        encoding, quality = resolve_cache_encoding(kw, ctx=ctx)
        data_config = DataConfig(dataset=kw["dataset"], data_dir=kw["data_dir"] or "", image_size=kw["image_size"],
                                 cache=kw["cache"] or "", download=kw["download"], limit=kw["limit"],
                                 cache_encoding=encoding, jpeg_quality=quality)
    announce(start, ctx, kw, ("preset", *FIELDS, *DATA_FIXED))
    train_set = load_split(data_config, "train")
    val_set = load_split(data_config, "test")
    if start.init is not None and train_set.channels != model_config.channels:
        raise UserError(f"--init-from {kw['init_from']} encodes {model_config.channels}-channel images, but the "
                        f"data have {train_set.channels} channel(s)")
    if checkpoint is None and start.init is None:
        model_config = vqvae_config_from_preset(kw["preset"], channels=train_set.channels,
                                                **{k: kw[k] for k in FIELDS})
    stride = model_config.total_stride
    if train_set.height % stride or train_set.width % stride:
        raise click.UsageError(f"images of {train_set.height}x{train_set.width} are not divisible by the "
                               f"VQ-VAE's total stride {stride}")
    train_config = train_config_from_options(ctx, kw, checkpoint, device)
    task = VQVAETask(model_config, data_config)
    echo(f"VQ-VAE ({model_config.levels} level(s), {model_config.codebook_size} codes): "
               f"{sum(p.numel() for p in task.build_model().parameters()):,} parameters; {len(train_set)} train / "
               f"{len(val_set)} held-out images; device {device}, precision {train_config.precision}", err=True)
    result = run_training(task, train_set, val_set, train_config, kw, checkpoint, device, start.init_weights)
    m = result["metrics"]
    if result["status"] == "stopped":
        echo(f"Stopped at step {result['step']}; checkpoint saved to {result['checkpoint']}.")
        return
    summary = ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("eval_"))
    echo(f"step {result['step']}: {summary}; checkpoint {result['checkpoint']}")


def arch_conflicts(ctx, kw, model_config) -> list[str]:
    """Explicit --preset / architecture options that disagree with ``model_config`` (the run's or --init-from's)."""
    from vqprior.models.vqvae import vqvae_config_from_preset

    have = model_config.to_dict()
    from_options = vqvae_config_from_preset(kw["preset"], channels=model_config.channels,
                                            **{k: kw[k] for k in FIELDS}).to_dict()
    return architecture_conflicts(ctx, kw, from_options, have, {k: k for k in FIELDS})
