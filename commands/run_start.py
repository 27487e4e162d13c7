"""The start of a train command: the run folder, ``--resume`` and ``--init-from``, and the rule that no option is
silently dropped.

* ``--resume`` continues the run in ``--out``. What defines the run (architecture, data, preset) is kept: such an
  option given explicitly is refused when its value differs from the run's (so the same command line can simply be
  re-run with ``--resume``). Every other option given (steps, intervals, workers, tensorboard, learning rate, ...)
  is applied, and they are echoed on one line.
* ``--init-from CKPT`` starts a new run (step 0, fresh optimizer) from the weights of any checkpoint of the same
  kind, exported ones included; the checkpoint fixes the architecture the same way.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from vqprior.commands.common import refuse_unused, resolve_device, setup_logging

NOT_ECHOED = ("out_dir", "resume", "init_from")


def run_training(task, train_set, val_set, train_config, kw: dict, checkpoint, device, init_weights) -> dict:
    """``vqprior.training.loop.train`` for a train command, after the process-wide host-memory setting that suits
    it: freed memory kept for the next step, or given back at once with --checkpoint-activations (memory first)."""
    from vqprior.runtime.allocator import configure_for_training
    from vqprior.training.loop import train

    configure_for_training(train_config.checkpoint_activations)
    return train(task, train_set, val_set, train_config, kw["out_dir"], checkpoint=checkpoint, device=device,
                 progress=not kw["quiet"], num_workers=kw["workers"], tensorboard=kw["tensorboard"],
                 init_weights=init_weights)


@dataclasses.dataclass
class RunStart:
    device: Any
    echo: Callable
    checkpoint: dict | None  # the run's latest.pt when resuming
    init: dict | None  # the --init-from checkpoint

    @property
    def init_weights(self):
        """The --init-from checkpoint's model weights (EMA when it has them; an export's model is its EMA)."""
        return (self.init.get("ema") or self.init["model"]) if self.init else None


def start_run(ctx: click.Context, kw: dict, kind: str) -> RunStart:
    """Validate --resume / --init-from (one-line errors before any data is loaded), pick the device, join the
    process group under torchrun and prepare the run folder. ``echo`` prints on rank 0 only."""
    from vqprior.checkpoint import build_model, read_checkpoint
    from vqprior.training.distributed import init_distributed, world_size_from_env
    from vqprior.training.run_state import prepare_run_dir

    init = None
    if kw["init_from"]:
        if kw["resume"]:
            raise click.UsageError("--init-from starts a new run and --resume continues one: pass only one")
        init = read_checkpoint(kw["init_from"], kind)
        build_model(init, path=kw["init_from"])  # its weights must fit its config: one line now, not a traceback
    if world_size_from_env() <= 1:
        refuse_unused(("dist_timeout",), "in a single-process run (it bounds the waits between torchrun's processes)",
                      ctx)
    setup_logging()  # the held-out evaluation of every eval interval is a line on stderr
    rank, _, device = init_distributed(resolve_device(kw["device"]), kw["dist_timeout"])
    echo = click.echo if rank == 0 else (lambda *args, **kwargs: None)
    checkpoint = prepare_run_dir(kw["out_dir"], kw["resume"], kind)
    return RunStart(device, echo, checkpoint, init)


def explicit(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def spelled(ctx: click.Context, name: str, value: Any = True) -> str:
    """How option ``name`` with ``value`` is written on the command line: ``--steps 2000``, ``--quiet``,
    ``--no-attention``."""
    param = next(p for p in ctx.command.params if p.name == name)
    if getattr(param, "is_flag", False):
        return param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0]
    return f"{param.opts[0]} {value}"


def same_path(a: str, b: str) -> bool:
    return (a or "") == (b or "") or bool(a and b and Path(a).resolve() == Path(b).resolve())


def differing(ctx: click.Context, kw: dict, have: dict[str, Any], equal=lambda a, b: a == b) -> list[str]:
    """Explicit options whose value differs from ``have`` (option name -> the run's / checkpoint's value), each as
    "--name VALUE (was HAVE)"."""
    out = []
    for name, value in have.items():
        if explicit(ctx, name) and not equal(kw[name], value):
            was = ("on" if value else "off") if isinstance(value, bool) else (value if value != "" else "unset")
            out.append(f"{spelled(ctx, name, kw[name])} (was {was})")
    return out


def architecture_conflicts(ctx: click.Context, kw: dict, from_options: dict, have: dict, fields: dict) -> list[str]:
    """Explicit architecture options that would change the architecture ``have`` (a config dict): ``from_options``
    is the config the options give (preset plus overrides), ``fields`` maps config field -> option name. A field
    that differs counts against its own option when given, else against an explicit --preset."""
    own = differing(ctx, kw, {fields[f]: have[f] for f in fields})
    by_preset = [f for f in fields if not explicit(ctx, fields[f]) and from_options[f] != have[f]]
    if by_preset and explicit(ctx, "preset"):
        own.append(f"--preset {kw['preset']} (its {', '.join(by_preset)} differ)")
    return own


def refuse(conflicts: list[str], what: str) -> None:
    if conflicts:
        raise click.UsageError(f"{'; '.join(conflicts)}: {what}")


def refuse_on_resume(conflicts: list[str], run: str) -> None:
    refuse(conflicts, f"a resumed run keeps the architecture and data of {run}; start a new run (another --out, "
                      f"--init-from to reuse its weights) to change them")


def refuse_with_init(conflicts: list[str], path: str) -> None:
    refuse(conflicts, f"--init-from takes the architecture of {path}; leave these options out")


def announce(start: RunStart, ctx: click.Context, kw: dict, fixed: tuple[str, ...]) -> None:
    """Say what the run starts from: "Resuming OUT from step N with: --steps 2000, --quiet." (the options applied
    on resume), or the checkpoint a new run is initialised from."""
    if start.checkpoint is not None:
        given = {**ctx.meta.get("vqprior.shared_options", {}), **kw}  # --threads (cli.py) is not in kw
        applied = [spelled(ctx, p.name, given[p.name]) for p in ctx.command.params
                   if p.name not in fixed + NOT_ECHOED and explicit(ctx, p.name) and p.name in given]
        tail = f" with: {', '.join(applied)}." if applied else "."
        start.echo(f"Resuming {kw['out_dir']} from step {start.checkpoint['step']}{tail}", err=True)
    elif start.init is not None:
        start.echo(f"Starting from the weights of {kw['init_from']} (a {start.init['kind']} checkpoint at step "
                   f"{start.init['step']}): new run, step 0, fresh optimizer.", err=True)


def null_class_start(ctx: click.Context, kw: dict, start: RunStart, model_config, conditional: bool):
    """(model config, --init-from weights) of a new run with ``--class-dropout``: a fresh class-conditional run gets
    a null class; an --init-from model without one gets it added (vqprior.models.null_class.add_null_class: each class
    embedding's null row starts at the mean of its class rows), which is said on stderr."""
    from dataclasses import replace

    from vqprior.models.null_class import add_null_class

    weights = start.init_weights
    if not kw["class_dropout"]:
        return model_config, weights
    if not conditional:
        where = f"--init-from {kw['init_from']} is not class-conditional" if start.init is not None else \
            "pass --class-conditional"
        raise click.UsageError(f"--class-dropout {kw['class_dropout']} trains a null class beside the classes of a "
                               f"class-conditional model: {where}")
    if model_config is None or model_config.null_class:
        return model_config, weights
    if start.init is not None:
        weights = add_null_class(weights, model_config)
        start.echo(f"--class-dropout: adding a null class to the {model_config.num_classes} classes of "
                   f"{kw['init_from']} (its embedding starts at the mean of the class embeddings).", err=True)
    return replace(model_config, null_class=True), weights


def resumed_data_config(ctx: click.Context, kw: dict, data_config):
    """The run's DataConfig with the options that may change on resume applied (the image cache, --download)."""
    from vqprior.commands.common import resolve_cache_encoding

    changes = {name: kw[name] or (False if name == "download" else "") for name in ("cache", "download")
               if explicit(ctx, name)}
    data_config = dataclasses.replace(data_config, **changes)
    encoding, quality = resolve_cache_encoding(dict(kw, cache=data_config.cache),
                                               (data_config.cache_encoding, data_config.jpeg_quality), ctx)
    return dataclasses.replace(data_config, cache_encoding=encoding, jpeg_quality=quality)


def data_conflicts(ctx: click.Context, kw: dict, data_config) -> list[str]:
    """The image data options a resumed run keeps (train-pixels, train-vqvae)."""
    d = data_config
    return (differing(ctx, kw, {"dataset": d.dataset, "image_size": d.image_size, "limit": d.limit})
            + differing(ctx, kw, {"data_dir": d.data_dir}, same_path))


DATA_FIXED = ("dataset", "data_dir", "image_size", "limit")


def class_dropout_conflicts(ctx: click.Context, kw: dict, data_config) -> list[str]:
    """--class-dropout on resume: the run keeps the objective it was started with."""
    return differing(ctx, kw, {"class_dropout": data_config.class_dropout})
