"""``vqprior train-prior``: train a PixelSNAIL code prior on an LMDB code cache (top, or a lower level given the
level directly above it)."""
from __future__ import annotations

import click

from vqprior.commands.common import (
    deterministic_option,
    device_option,
    guarded,
    refuse_unused,
    removes_new_folder_on_error,
)
from vqprior.commands.options import (
    PRIOR_MODEL_FIELDS,
    class_dropout_option,
    model_options,
    train_config_from_options,
    train_options,
)
from vqprior.commands.run_start import (
    announce,
    architecture_conflicts,
    class_dropout_conflicts,
    differing,
    null_class_start,
    refuse_on_resume,
    refuse_with_init,
    run_training,
    same_path,
    start_run,
)
from vqprior.levels import MAX_LEVELS, level_names

PRIOR_FIELDS = ("embed_dim", "cond_channels", "cond_layers", *PRIOR_MODEL_FIELDS)  # with --preset: the architecture
LEVELS = ["top", *dict.fromkeys(n for k in range(3, MAX_LEVELS + 1) for n in level_names(k)[1:-1]), "bottom"]


@click.command("train-prior")
@click.option("--codes", type=click.Path(), required=True, help="Training code cache (extract-codes --split train).")
@click.option("--val-codes", type=click.Path(), default=None, help="Held-out code cache for bits/code.")
@click.option("--level", type=click.Choice(LEVELS), default="top", show_default=True, metavar="LEVEL",
              help="Which code map to model: top or bottom; with 3 levels also middle, with N > 3 middle1 .. "
                   "middle{N-2} (`vqprior info CODES` lists them). Every level but the top one is conditioned on "
                   "the level directly above it (a 2-level bottom prior on the top codes).")
@click.option("--class-conditional", is_flag=True, help="Condition on the source images' class labels.")
@class_dropout_option
@click.option("--vqvae", "vqvae_path", type=click.Path(), default=None,
              help="The VQ-VAE checkpoint to embed (default: the one recorded in the cache, checked by sha256).")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None,
              help="Width of the learned embedding of a code index, the prior's input (not train-vqvae's "
                   "--embed-dim, the codebook vector width).")
@click.option("--cond-channels", type=click.IntRange(min=1), default=None,
              help="Bottom (and middle) priors: width of the condition stack over the codes of the level above.")
@click.option("--cond-layers", type=click.IntRange(min=0), default=None,
              help="Bottom (and middle) priors: residual 3x3 conv layers in the condition stack.")
@model_options(pixel_head=False)
@train_options
@device_option
@deterministic_option
@click.pass_context
@guarded
@removes_new_folder_on_error("out_dir")
def train_prior(ctx, **kw):
    """Train a categorical PixelSNAIL prior over VQ-VAE codes. The checkpoint embeds the VQ-VAE, so
    `vqprior sample PRIOR.pt` needs nothing else."""
    from pathlib import Path

    from vqprior.config import DataConfig, ModelConfig, model_config_from_preset
    from vqprior.data.codes import CodeDataset, read_code_metadata
    from vqprior.errors import UserError
    from vqprior.training.prior_task import PriorTask, load_vqvae_payload, prior_model_config

    start = start_run(ctx, kw, "prior")  # rank 0 alone prints and writes
    device, echo, checkpoint = start.device, start.echo, start.checkpoint
    meta = read_code_metadata(kw["codes"])
    init_weights = None
    if checkpoint is not None:
        model_config = ModelConfig.from_dict(checkpoint["config"]["model"])
        data_config = DataConfig.from_dict(checkpoint["config"]["data"])
        level = checkpoint["config"]["prior"]["level"]
        payload = checkpoint.get("vqvae")
        refuse_on_resume(arch_conflicts(ctx, kw, model_config, level)
                         + differing(ctx, kw, {"codes": data_config.cache}, same_path)
                         + vqvae_conflicts(ctx, kw, payload)
                         + class_dropout_conflicts(ctx, kw, data_config), kw["out_dir"])
    else:
        level = kw["level"]
        if start.init is not None:
            model_config = ModelConfig.from_dict(start.init["config"]["model"])
            level = start.init["config"].get("prior", {}).get("level", "top")
            refuse_with_init(arch_conflicts(ctx, kw, model_config, level), kw["init_from"])
        if level == "top":
            refuse_unused(("cond_channels", "cond_layers"), "for a top prior (only a bottom prior has a "
                                                            "condition stack)", ctx)  # (or a middle prior)
        vq_path = kw["vqvae_path"] or meta.get("vqvae_path")
        if not vq_path or not Path(vq_path).exists():
            raise UserError("the VQ-VAE checkpoint of this code cache was not found; pass it with --vqvae")
        payload = load_vqvae_payload(vq_path)
        if payload["sha256"] != meta.get("vqvae_sha256"):
            raise UserError(f"{vq_path} is not the VQ-VAE these codes were extracted with (sha256 differs)")
        conditional = model_config.num_classes > 0 if start.init is not None else kw["class_conditional"]
        if start.init is not None:
            check_init_codes(model_config, meta, level, kw["init_from"])
        else:
            base = model_config_from_preset(kw["preset"], head="codes", num_codes=2,
                                            **{k: kw[k] for k in PRIOR_FIELDS})
            model_config = prior_model_config(base, meta, level, kw["class_conditional"])
        model_config, init_weights = null_class_start(ctx, kw, start, model_config, conditional)
        data_config = DataConfig(dataset=meta.get("dataset", ""), cache=str(kw["codes"]),
                                 class_conditional=conditional, class_dropout=kw["class_dropout"])
    announce(start, ctx, kw, ("preset", "level", "class_conditional", "class_dropout", "codes", "vqvae_path",
                              *PRIOR_FIELDS))
    train_set = CodeDataset(kw["codes"], level)
    val_set = None
    if kw["val_codes"]:
        val_set = CodeDataset(kw["val_codes"], level)
        if val_set.metadata.get("vqvae_sha256") != meta.get("vqvae_sha256"):
            raise UserError("--val-codes was extracted with a different VQ-VAE than --codes")
        val_set.validate_records()
    train_set.validate_records()  # one clear line now rather than a worker traceback later
    train_config = train_config_from_options(ctx, kw, checkpoint, device)
    task = PriorTask(model_config, data_config, level, payload)
    echo(f"{level} prior over {model_config.height}x{model_config.width} codes ({model_config.num_codes} "
               f"codes): {sum(p.numel() for p in task.build_model().parameters()):,} parameters; {len(train_set)} "
               f"train / {len(val_set) if val_set else 0} held-out maps; device {device}, "
               f"precision {train_config.precision}", err=True)
    result = run_training(task, train_set, val_set, train_config, kw, checkpoint, device, init_weights)
    if result["status"] == "stopped":
        echo(f"Stopped at step {result['step']}; checkpoint saved to {result['checkpoint']}.")
        return
    bpc = result["metrics"].get("eval_bits_per_code")
    held = f"held-out {bpc:.4f} bits/code; " if bpc is not None else ""
    echo(f"step {result['step']}: {held}checkpoint {result['checkpoint']}")


def arch_conflicts(ctx, kw, model_config, level: str) -> list[str]:
    """Explicit architecture options (--preset, widths, --level, --class-conditional) that disagree with
    ``model_config`` / ``level`` (the run's or the --init-from checkpoint's)."""
    from vqprior.config import model_config_from_preset

    have = model_config.to_dict()
    from_options = model_config_from_preset(kw["preset"], head="codes", num_codes=2,
                                            **{k: kw[k] for k in PRIOR_FIELDS}).to_dict()
    return (architecture_conflicts(ctx, kw, from_options, have, {k: k for k in PRIOR_FIELDS})
            + differing(ctx, kw, {"level": level, "class_conditional": model_config.num_classes > 0}))


def vqvae_conflicts(ctx, kw, payload) -> list[str]:
    """--vqvae on resume must name the VQ-VAE the run embeds (same file content)."""
    from vqprior.errors import UserError
    from vqprior.io import file_sha256

    if not kw["vqvae_path"] or payload is None:
        return []
    try:
        same = file_sha256(kw["vqvae_path"]) == payload.get("sha256")
    except OSError as e:
        raise UserError(f"cannot read --vqvae {kw['vqvae_path']}: {e.strerror}") from None
    return [] if same else [f"--vqvae {kw['vqvae_path']} (not the VQ-VAE the run embeds)"]


def check_init_codes(model_config, meta, level: str, path) -> None:
    """An --init-from prior must model the cache's level: codebook size, code map shape, the condition on the level
    above and classes."""
    from vqprior.errors import UserError
    from vqprior.training.prior_task import check_prior_against_cache

    if level not in meta["level_names"]:
        raise UserError(f"--init-from {path} is a {level} prior, but the code cache has no {level} level")
    try:
        check_prior_against_cache(model_config, meta, level)
    except UserError as e:
        raise UserError(f"--init-from {path} does not fit the code cache: {e}") from None
    classes = int(meta.get("num_classes", 0))
    if model_config.num_classes and classes != model_config.num_classes:
        raise UserError(f"--init-from {path} is class-conditional over {model_config.num_classes} classes, but the "
                        f"code cache has {classes or 'no'} class labels")
