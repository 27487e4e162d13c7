"""``vqprior train-pixels``: train PixelSNAIL with the logistic-mixture head on images (bits/dim)."""
from __future__ import annotations

import click

from vqprior.commands.common import (
    check_dataset_options,
    deterministic_option,
    device_option,
    guarded,
    removes_new_folder_on_error,
    resolve_cache_encoding,
)
from vqprior.commands.options import (
    MODEL_FIELDS,
    class_dropout_option,
    data_options,
    model_options,
    train_config_from_options,
    train_options,
)
from vqprior.commands.run_start import (
    DATA_FIXED,
    announce,
    architecture_conflicts,
    class_dropout_conflicts,
    data_conflicts,
    differing,
    null_class_start,
    refuse_on_resume,
    refuse_with_init,
    resumed_data_config,
    run_training,
    start_run,
)

ARCHITECTURE = ("preset", "class_conditional", *MODEL_FIELDS)  # fixed by a resumed run or an --init-from checkpoint


@click.command("train-pixels")
@data_options
@click.option("--class-conditional", is_flag=True, help="Condition on the dataset's class labels.")
@class_dropout_option
@click.option("--perturb", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              metavar="P",
              help="Train a background model for `score --background`: replace a fraction P of the sub-pixels of "
                   "each training batch by uniform random values 0..255 (Ren et al. 2019 use 0.1-0.3). Held-out "
                   "bits/dim stay on clean images. A resumed run keeps it.")
@model_options
@train_options
@device_option
@deterministic_option
@click.pass_context
@guarded
@removes_new_folder_on_error("out_dir")
def train_pixels(ctx, **kw):
    """Train a pixel-level PixelSNAIL; evaluates held-out bits/dim with EMA weights and writes sample grids.

    Example: vqprior train-pixels --dataset cifar10 --data-dir data/cifar10 --preset small --out runs/c10
    """
    from pathlib import Path

    from vqprior.config import DataConfig, ModelConfig, model_config_from_preset
    from vqprior.training.pixel_task import PixelTask

    start = start_run(ctx, kw, "pixels")  # rank 0 alone prints and writes
    device, echo, checkpoint = start.device, start.echo, start.checkpoint
    model_config, init_weights = None, None
    if checkpoint is not None:
        data_config = DataConfig.from_dict(checkpoint["config"]["data"])
        model_config = ModelConfig.from_dict(checkpoint["config"]["model"])
        refuse_on_resume(arch_conflicts(ctx, kw, model_config) + data_conflicts(ctx, kw, data_config)
                         + class_dropout_conflicts(ctx, kw, data_config)
                         + differing(ctx, kw, {"perturb": data_config.perturb}), kw["out_dir"])
        data_config = resumed_data_config(ctx, kw, data_config)
    else:
        encoding, quality = resolve_cache_encoding(kw, ctx=ctx)
        check_dataset_options(kw["dataset"], ctx)
        if start.init is not None:
            model_config = ModelConfig.from_dict(start.init["config"]["model"])
            refuse_with_init(arch_conflicts(ctx, kw, model_config), kw["init_from"])
        conditional = model_config.num_classes > 0 if start.init is not None else kw["class_conditional"]
        model_config, init_weights = null_class_start(ctx, kw, start, model_config, conditional)
        data_config = DataConfig(dataset=kw["dataset"], data_dir=kw["data_dir"] or "", image_size=kw["image_size"],
                                 cache=kw["cache"] or "", download=kw["download"], class_conditional=conditional,
                                 limit=kw["limit"], class_dropout=kw["class_dropout"], cache_encoding=encoding,
                                 jpeg_quality=quality, perturb=kw["perturb"])
    announce(start, ctx, kw, ARCHITECTURE + DATA_FIXED + ("class_dropout", "perturb"))  # a resumed run keeps these
    train_set = load_split(data_config, "train")
    val_set = load_split(data_config, "test")
    if start.init is not None:
        check_init_data(model_config, train_set, kw["init_from"])
    elif checkpoint is None:
        if data_config.class_conditional and not train_set.num_classes:
            raise click.UsageError(f"--class-conditional: dataset {data_config.dataset} has no class labels")
        model_config = model_config_from_preset(
            kw["preset"], head="pixels", channels=train_set.channels, height=train_set.height, width=train_set.width,
            num_classes=train_set.num_classes if data_config.class_conditional else 0,
            null_class=data_config.class_dropout > 0,
            **{k: kw[k] for k in MODEL_FIELDS})
    train_config = train_config_from_options(ctx, kw, checkpoint, device)
    task = PixelTask(model_config, data_config)
    n_params = sum(p.numel() for p in task.build_model().parameters())
    echo(f"PixelSNAIL {n_params:,} parameters; {len(train_set)} train / {len(val_set)} held-out images "
               f"{train_set.channels}x{train_set.height}x{train_set.width}; device {device}, "
               f"precision {train_config.precision}", err=True)
    result = run_training(task, train_set, val_set, train_config, kw, checkpoint, device, init_weights)
    bpd = result["metrics"].get("eval_bpd")
    where = Path(kw["out_dir"])
    if result["status"] == "stopped":
        echo(f"Stopped at step {result['step']}; checkpoint saved to {result['checkpoint']}.")
        return
    grid = where / f"samples_step{result['step']}.png"
    echo(f"step {result['step']}: held-out {bpd:.4f} bits/dim; samples {grid}; checkpoint {result['checkpoint']}"
               if bpd is not None else f"step {result['step']}: checkpoint {result['checkpoint']}")


def arch_conflicts(ctx, kw, model_config) -> list[str]:
    """Explicit architecture options that disagree with ``model_config`` (the run's or the --init-from one)."""
    from vqprior.config import model_config_from_preset

    have = model_config.to_dict()
    from_options = model_config_from_preset(kw["preset"], **{k: have[k] for k in ("head", "channels", "height",
                                                                                   "width", "num_classes")},
                                            **{k: kw[k] for k in MODEL_FIELDS}).to_dict()
    return (architecture_conflicts(ctx, kw, from_options, have, {k: k for k in MODEL_FIELDS})
            + differing(ctx, kw, {"class_conditional": model_config.num_classes > 0}))


def check_init_data(model_config, train_set, path) -> None:
    """The data of an --init-from run must be what the checkpoint models: image shape and class labels."""
    from vqprior.errors import UserError

    c, data = model_config, (train_set.channels, train_set.height, train_set.width)
    if data != (c.channels, c.height, c.width):
        raise UserError(f"--init-from {path} models {c.channels}x{c.height}x{c.width} images, but the data are "
                        f"{'x'.join(map(str, data))} (--image-size resizes and crops)")
    if c.num_classes and train_set.num_classes != c.num_classes:
        have = f"{train_set.num_classes} classes" if train_set.num_classes else "no class labels"
        raise UserError(f"--init-from {path} is class-conditional over {c.num_classes} classes, but the data have "
                        f"{have}")


def load_split(data_config, split: str):
    """The train (its first ``data_config.limit`` images when set) or held-out split a DataConfig names."""
    from vqprior.data.loader import load_image_dataset

    return load_image_dataset(data_config.dataset, split, data_dir=data_config.data_dir or None,
                              image_size=data_config.image_size, cache=data_config.cache or None,
                              download=data_config.download, limit=data_config.limit if split == "train" else 0,
                              cache_encoding=data_config.cache_encoding, jpeg_quality=data_config.jpeg_quality)
