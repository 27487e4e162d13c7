"""``vqprior train-prior``: train a PixelSNAIL code prior on an LMDB code cache (top, or bottom given top)."""
from __future__ import annotations

import click

from .common import device_option, guarded, refuse_unused, removes_new_folder_on_error, start_run
from .options import MODEL_FIELDS, model_options, train_config_from_options, train_options


@click.command("train-prior")
@click.option("--codes", type=click.Path(), required=True, help="Training code cache (extract-codes --split train).")
@click.option("--val-codes", type=click.Path(), default=None, help="Held-out code cache for bits/code.")
@click.option("--level", type=click.Choice(["top", "bottom"]), default="top", show_default=True,
              help="Which code map to model; a bottom prior is conditioned on the top codes.")
@click.option("--class-conditional", is_flag=True, help="Condition on the source images' class labels.")
@click.option("--vqvae", "vqvae_path", type=click.Path(), default=None,
              help="The VQ-VAE checkpoint to embed (default: the one recorded in the cache, checked by sha256).")
@click.option("--embed-dim", type=click.IntRange(min=1), default=None,
              help="Width of the learned embedding of a code index, the prior's input (not train-vqvae's "
                   "--embed-dim, the codebook vector width).")
@click.option("--cond-channels", type=click.IntRange(min=1), default=None,
              help="Bottom priors: width of the top-code condition stack.")
@click.option("--cond-layers", type=click.IntRange(min=0), default=None,
              help="Bottom priors: residual 3x3 conv layers in the condition stack.")
@model_options
@train_options
@device_option
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
    from vqprior.prior_task import PriorTask, load_vqvae_payload, prior_model_config
    from vqprior.train import train

    device, echo, checkpoint = start_run(kw, "prior")  # rank 0 alone prints and writes
    meta = read_code_metadata(kw["codes"])
    if checkpoint is not None:
        model_config = ModelConfig.from_dict(checkpoint["config"]["model"])
        data_config = DataConfig.from_dict(checkpoint["config"]["data"])
        level = checkpoint["config"]["prior"]["level"]
        payload = checkpoint.get("vqvae")
    else:
        level = kw["level"]
        refuse_unused(("mixtures",), "for a code prior (the logistic mixture is the pixel head's)", ctx)
        if level == "top":
            refuse_unused(("cond_channels", "cond_layers"), "for a top prior (only a bottom prior has a "
                                                            "condition stack)", ctx)
        vq_path = kw["vqvae_path"] or meta.get("vqvae_path")
        if not vq_path or not Path(vq_path).exists():
            raise UserError("the VQ-VAE checkpoint of this code cache was not found; pass it with --vqvae")
        payload = load_vqvae_payload(vq_path)
        if payload["sha256"] != meta.get("vqvae_sha256"):
            raise UserError(f"{vq_path} is not the VQ-VAE these codes were extracted with (sha256 differs)")
        data_config = DataConfig(dataset=meta.get("dataset", ""), cache=str(kw["codes"]),
                                 class_conditional=kw["class_conditional"])
        base = model_config_from_preset(kw["preset"], head="codes", num_codes=2, embed_dim=kw["embed_dim"],
                                        cond_channels=kw["cond_channels"], cond_layers=kw["cond_layers"],
                                        **{k: kw[k] for k in MODEL_FIELDS})
        model_config = prior_model_config(base, meta, level, kw["class_conditional"])
    train_set = CodeDataset(kw["codes"], level)
    val_set = None
    if kw["val_codes"]:
        val_set = CodeDataset(kw["val_codes"], level)
        if val_set.metadata.get("vqvae_sha256") != meta.get("vqvae_sha256"):
            raise UserError("--val-codes was extracted with a different VQ-VAE than --codes")
        val_set.validate_records()
    train_set.validate_records()  # one clear line now rather than a worker traceback later
    train_config = train_config_from_options(ctx, kw, checkpoint)
    task = PriorTask(model_config, data_config, level, payload)
    echo(f"{level} prior over {model_config.height}x{model_config.width} codes ({model_config.num_codes} "
               f"codes): {sum(p.numel() for p in task.build_model().parameters()):,} parameters; {len(train_set)} "
               f"train / {len(val_set) if val_set else 0} held-out maps; device {device}", err=True)
    result = train(task, train_set, val_set, train_config, kw["out_dir"], checkpoint=checkpoint, device=device,
                   progress=not kw["quiet"], num_workers=kw["workers"], tensorboard=kw["tensorboard"])
    if result["status"] == "stopped":
        echo(f"Stopped at step {result['step']}; checkpoint saved to {result['checkpoint']}.")
        return
    bpc = result["metrics"].get("eval_bits_per_code")
    held = f"held-out {bpc:.4f} bits/code; " if bpc is not None else ""
    echo(f"step {result['step']}: {held}checkpoint {result['checkpoint']}")
