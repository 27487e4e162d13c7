"""Click options shared by the training commands: model architecture and the optimisation loop.

Every architecture field of ``ModelConfig`` and every ``TrainConfig`` field has an option with the same name in
kebab-case. Architecture options default to the preset's value; training options to ``TrainConfig``'s.
"""
from __future__ import annotations

import click

from vqprior.commands.common import download_option, precision_option
from vqprior.config import PRESETS, TrainConfig

_TRAIN_DEFAULTS = TrainConfig()


def model_options(fn=None, pixel_head: bool = True):
    """--preset plus one option per architecture field (unset = the preset's value); --mixtures with the pixel
    head only."""
    if fn is None:
        return lambda f: model_options(f, pixel_head)
    opts = [
        click.option("--preset", type=click.Choice(list(PRESETS)), default="small", show_default=True,
                     help="Architecture preset; the options below override single fields."),
        click.option("--filters", type=click.IntRange(min=1), help="Channels of the residual stream."),
        click.option("--blocks", type=click.IntRange(min=1), help="PixelSNAIL blocks (each ends in attention)."),
        click.option("--res-blocks", type=click.IntRange(min=1),
                     help="Gated residual blocks per PixelSNAIL block (train-vqvae's --res-blocks is another thing)."),
        click.option("--kernel-size", type=click.IntRange(min=1), help="Size k of the k x k causal convolutions."),
        click.option("--attention/--no-attention", default=None, help="Causal self-attention (default on)."),
        click.option("--attn-heads", type=click.IntRange(min=1), help="Attention heads."),
        click.option("--key-channels", type=click.IntRange(min=1), help="Attention key/query channels."),
        click.option("--value-channels", type=click.IntRange(min=1), help="Attention value channels."),
        click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True), help="Dropout rate."),
    ]
    if pixel_head:
        opts.append(click.option("--mixtures", type=click.IntRange(min=1), help="Logistic mixture components."))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


MODEL_FIELDS = ("filters", "blocks", "res_blocks", "kernel_size", "attention", "attn_heads", "key_channels",
                "value_channels", "dropout", "mixtures")
PRIOR_MODEL_FIELDS = MODEL_FIELDS[:-1]  # a code prior's head is categorical: no --mixtures


def train_options(fn=None, **defaults):
    """One option per TrainConfig field; ``defaults`` override TrainConfig's (e.g. ema=0.0 for the VQ-VAE)."""
    if fn is None:
        return lambda f: train_options(f, **defaults)
    d = TrainConfig(**defaults) if defaults else _TRAIN_DEFAULTS
    opts = [
        click.option("--steps", type=click.IntRange(min=1), default=d.steps, show_default=True,
                     help="Total optimisation steps (with --resume: the new total)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=d.batch_size, show_default=True,
                     help="Images (code maps) per micro-batch, over all processes of a torchrun run."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=d.grad_accum, show_default=True,
                     metavar="N",
                     help="Sum the gradients of N micro-batches before each step: the effective batch is N x "
                          "--batch-size at the memory of one micro-batch (no all-reduce on the N-1 inner ones)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=d.lr, show_default=True,
                     help="Adam learning rate."),
        click.option("--lr-decay", type=click.FloatRange(0, 1), default=d.lr_decay, show_default=True,
                     help="Learning-rate factor per step."),
        click.option("--cooldown-steps", type=click.IntRange(min=0), default=d.cooldown_steps, show_default=True,
                     metavar="N",
                     help="Take the learning rate linearly down to zero over the last N steps before --steps (an "
                          "anneal at the end of the budget; with --resume it may be set for the new --steps); 0: "
                          "off. With --time-limit, set --steps to the step the limit will reach."),
        click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=d.ema, show_default=True,
                     help="Polyak EMA decay (EMA weights are evaluated and sampled)."),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=d.grad_clip, show_default=True,
                     help="Clip the gradient norm (0: off)."),
        click.option("--eval-every", type=click.IntRange(min=1), default=d.eval_every, show_default=True),
        click.option("--sample-every", type=click.IntRange(min=1), default=d.sample_every, show_default=True),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=d.checkpoint_every,
                     show_default=True),
        click.option("--eval-limit", type=click.IntRange(min=0), default=d.eval_limit, show_default=True,
                     help="Evaluate on the first N held-out items (0: all)."),
        click.option("--num-samples", type=click.IntRange(min=1), default=d.num_samples, show_default=True,
                     help="Images in each sample grid."),
        click.option("--seed", type=int, default=d.seed, show_default=True),
        precision_option(training=True),
        click.option("--compile/--no-compile", "compile", default=d.compile, show_default=True,
                     help="torch.compile the training model (needs a C++ compiler on CPU, Triton on CUDA); the "
                          "first step's compile time is reported once."),
        click.option("--checkpoint-activations/--no-checkpoint-activations", "checkpoint_activations",
                     default=d.checkpoint_activations, show_default=True,
                     help="Recompute each gated block and attention step (its parts one at a time), the stem and "
                          "the condition stack in the backward pass, and give freed host memory back at once: less "
                          "memory, more time per step."),
        click.option("--time-limit", type=click.FloatRange(min=0), default=d.time_limit, show_default=True,
                     metavar="MINUTES",
                     help="End the run (final evaluation, samples, checkpoint) once this many minutes of step time "
                          "(train_seconds, resumes included) have passed, even before --steps; 0: off."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
                     help="Run folder: latest.pt, metrics.jsonl, sample grids."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out from its latest.pt (architecture and data options must agree "
                          "with the run; the others are applied)."),
        click.option("--init-from", type=click.Path(dir_okay=False), default=None,
                     help="Start a new run from this checkpoint's weights (any checkpoint of this kind, exports "
                          "included): its architecture, a fresh optimizer, step 0."),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="DataLoader worker processes."),
        click.option("--dist-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                     metavar="MINUTES",
                     help="Under torchrun: how long a process waits for the others (e.g. while rank 0 alone writes "
                          "a checkpoint or a sample grid) before the run ends with an error."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--tensorboard", is_flag=True,
                     help="Also log scalars and sample grids to OUT/tensorboard (pip install 'vqprior[tensorboard]')."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "lr_decay", "cooldown_steps", "ema", "grad_clip",
                "eval_every", "sample_every", "checkpoint_every", "eval_limit", "num_samples", "seed", "precision",
                "compile", "checkpoint_activations", "time_limit")


def train_config_from_options(ctx: click.Context, kwargs: dict, checkpoint: dict | None, device) -> TrainConfig:
    """A fresh run takes every option; a resumed run keeps its stored config except options given explicitly.
    ``--precision auto`` becomes the training default for ``device`` (vqprior.runtime.precision); a precision the device
    cannot run (bf16 on a GPU that only emulates it) is a one-line error now, not mid-run."""
    from vqprior.runtime.precision import check_precision, resolve_training_precision

    values = {k: kwargs[k] for k in TRAIN_FIELDS}
    values["precision"] = resolve_training_precision(values["precision"], device)
    if checkpoint is not None:
        stored = TrainConfig.from_dict(checkpoint["config"]["train"]).to_dict()
        values.update({k: stored[k] for k in TRAIN_FIELDS
                       if ctx.get_parameter_source(k) in (click.core.ParameterSource.DEFAULT, None)})
    config = TrainConfig(**values)
    check_precision(config.precision, device)
    return config


def class_dropout_option(fn):
    """--class-dropout: train a null class beside the classes (classifier-free guidance, docs/guidance.md)."""
    return click.option("--class-dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
                        show_default=True, metavar="P",
                        help="Class-conditional models: replace each training label by a learned null class with "
                             "probability P, so the model also learns p(x) and can be sampled with --guidance "
                             "(0.1-0.2 is usual). With --init-from a model without a null class, adds one.")(fn)


DATASETS = ["sample", "cifar10", "mnist", "fashion-mnist", "imagenet32", "imagenet64", "folder"]


def data_options(fn):
    """Where the images come from (see vqprior.data.datasets)."""
    opts = [
        click.option("--dataset", type=click.Choice(DATASETS), default="sample", show_default=True,
                     help="sample = the bundled real CIFAR-10 subset (no download)."),
        click.option("--data-dir", type=click.Path(), default=None,
                     help="Dataset folder: train.npz/test.npz, torchvision files, ImageNet PNG folders or images."),
        click.option("--image-size", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Resize/crop to this size (0: native; required for mixed-size folders)."),
        click.option("--cache", type=click.Path(file_okay=False), default=None,
                     help="LMDB folder caching decoded images for later runs."),
        download_option,
        click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Use only the first N training images (0: all)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    from vqprior.commands.common import cache_encoding_options

    return cache_encoding_options(fn)
