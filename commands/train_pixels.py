"""``vqprior train-pixels``: train PixelSNAIL with the logistic-mixture head on images (bits/dim)."""
from __future__ import annotations

import click

from .common import check_dataset_options, device_option, guarded, removes_new_folder_on_error, start_run
from .options import MODEL_FIELDS, data_options, model_options, train_config_from_options, train_options


@click.command("train-pixels")
@data_options
@click.option("--class-conditional", is_flag=True, help="Condition on the dataset's class labels.")
@model_options
@train_options
@device_option
@click.pass_context
@guarded
@removes_new_folder_on_error("out_dir")
def train_pixels(ctx, **kw):
    """Train a pixel-level PixelSNAIL; evaluates held-out bits/dim with EMA weights and writes sample grids.

    Example: vqprior train-pixels --dataset cifar10 --data-dir data/cifar10 --preset small --out runs/c10
    """
    from pathlib import Path

    from vqprior.config import DataConfig, ModelConfig, model_config_from_preset
    from vqprior.pixel_task import PixelTask
    from vqprior.train import train

    device, echo, checkpoint = start_run(kw, "pixels")  # rank 0 alone prints and writes
    if checkpoint is not None:
        data_config = DataConfig.from_dict(checkpoint["config"]["data"])
        model_config = ModelConfig.from_dict(checkpoint["config"]["model"])
    else:
        check_dataset_options(kw["dataset"], ctx)
        data_config = DataConfig(dataset=kw["dataset"], data_dir=kw["data_dir"] or "", image_size=kw["image_size"],
                                 cache=kw["cache"] or "", download=kw["download"],
                                 class_conditional=kw["class_conditional"])
    train_set = load_split(data_config, "train", kw["limit"])
    val_set = load_split(data_config, "test", 0)
    if checkpoint is None:
        if data_config.class_conditional and not train_set.num_classes:
            raise click.UsageError(f"--class-conditional: dataset {data_config.dataset} has no class labels")
        model_config = model_config_from_preset(
            kw["preset"], head="pixels", channels=train_set.channels, height=train_set.height, width=train_set.width,
            num_classes=train_set.num_classes if data_config.class_conditional else 0,
            **{k: kw[k] for k in MODEL_FIELDS})
    train_config = train_config_from_options(ctx, kw, checkpoint)
    task = PixelTask(model_config, data_config)
    n_params = sum(p.numel() for p in task.build_model().parameters())
    echo(f"PixelSNAIL {n_params:,} parameters; {len(train_set)} train / {len(val_set)} held-out images "
               f"{train_set.channels}x{train_set.height}x{train_set.width}; device {device}", err=True)
    result = train(task, train_set, val_set, train_config, kw["out_dir"], checkpoint=checkpoint, device=device,
                   progress=not kw["quiet"], num_workers=kw["workers"], tensorboard=kw["tensorboard"])
    bpd = result["metrics"].get("eval_bpd")
    where = Path(kw["out_dir"])
    if result["status"] == "stopped":
        echo(f"Stopped at step {result['step']}; checkpoint saved to {result['checkpoint']}.")
        return
    grid = where / f"samples_step{result['step']}.png"
    echo(f"step {result['step']}: held-out {bpd:.4f} bits/dim; samples {grid}; checkpoint {result['checkpoint']}"
               if bpd is not None else f"step {result['step']}: checkpoint {result['checkpoint']}")


def load_split(data_config, split: str, limit: int):
    """The train or held-out split a DataConfig names."""
    from vqprior.data.datasets import load_image_dataset

    return load_image_dataset(data_config.dataset, split, data_dir=data_config.data_dir or None,
                              image_size=data_config.image_size, cache=data_config.cache or None,
                              download=data_config.download, limit=limit)
