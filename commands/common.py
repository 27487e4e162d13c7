"""Shared CLI plumbing: the error guard (one-line errors, non-zero exits), device selection, common options."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import click

from vqprior.errors import UserError

BUG_LINE = ("vqprior stopped on an internal error, not on your input: please report it with the traceback above "
            "(vqprior --version names the versions).")


def guarded(fn):
    """Run a command body. Whose error it is decides what the user sees: a ``UserError`` (bad input, raised where the
    input is checked) or an ``OSError`` (a missing file, a full disk) becomes ``Error: <one line>`` on stderr and
    exit 1 (2 for usage errors); anything else is a bug and propagates with its traceback (the CLI's entry point adds
    one line asking to report it: ``report_bugs``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except (UserError, OSError) as e:
            raise click.ClickException(_one_line(e)) from None

    return wrapper


def report_bugs(exc_type, exc, tb) -> None:
    """``sys.excepthook`` of the CLI process: Python's traceback of an uncaught exception (a bug: input errors never
    get this far), then ``BUG_LINE``."""
    sys.__excepthook__(exc_type, exc, tb)
    if not issubclass(exc_type, KeyboardInterrupt):
        print(BUG_LINE, file=sys.stderr)


def removes_new_folder_on_error(option: str, discard=lambda folder: not (folder / "latest.pt").exists()):
    """Decorator: when the command fails, remove the folder named by keyword ``option`` (and parents it made)
    if the command created it and ``discard(folder)`` says it holds nothing worth keeping (by default: no
    checkpoint, so a started run keeps its folder and can ``--resume``). A refused or failed fresh run (a bad
    option, a full disk before the first checkpoint) thus leaves no stray folder behind."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            new = []  # folders that do not exist yet, innermost first
            if kwargs.get(option):
                p = Path(kwargs[option]).absolute()
                while not os.path.lexists(p) and p != p.parent:
                    new.append(p)
                    p = p.parent
            try:
                return fn(*args, **kwargs)
            except BaseException:
                if new and new[0].is_dir() and not new[0].is_symlink() and discard(new[0]):
                    shutil.rmtree(new[0], ignore_errors=True)
                for folder in new:
                    if not os.path.lexists(folder):
                        continue
                    try:
                        folder.rmdir()  # parents only while empty
                    except OSError:
                        break
                raise

        return wrapper

    return decorate


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split())


def resolve_device(name: str):
    """``auto`` -> cuda when available, else cpu, with one warning line when the machine has a GPU torch cannot use
    (vqprior.runtime.device.cuda_unusable); otherwise the named device, checked up front
    (vqprior.runtime.device.check_device: cpu, cuda or cuda:N with N an existing GPU)."""
    import torch

    from vqprior.runtime.device import check_device, cuda_unusable

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        unusable = cuda_unusable()
        if unusable:
            click.echo(f"Warning: {unusable}; running on the CPU", err=True)
        return torch.device("cpu")
    return check_device(name)


device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when available), cpu, cuda or cuda:N.")
middle_option = click.option(
    "--middle", type=click.Path(), multiple=True,
    help="Prior of a middle level of a 3+-level VQ-VAE (repeat once per middle level, in any order).")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # vqprior.config.PRECISIONS, spelled out so --help stays fast


def precision_option(sampling: bool = False, training: bool = False):
    """--precision (vqprior.runtime.precision): fp32 (strict, TF32 off on CUDA), tf32 (CUDA TF32), bf16 / fp16
    (autocast); the train commands add ``auto`` (their default: tf32 on Ampere+ GPUs, else fp32)."""
    exact = ", the cached sampler exact" if sampling else ""
    bf16 = "; sampling arithmetic stays float32" if sampling else ""
    auto = ("auto: tf32 on CUDA GPUs of compute capability 8.0+ (Ampere), else fp32 (the value used is printed and "
            "stored with the run); ") if training else ""
    scaler = " with loss scaling (GradScaler)" if training else ""
    return click.option("--precision", type=click.Choice(("auto",) * training + PRECISIONS),
                        default="auto" if training else "fp32", show_default=True,
                        help=f"{auto}fp32: strict float32{exact} (TF32 off on CUDA); tf32: TF32 matmuls and "
                             f"convolutions on CUDA; bf16: autocast of the model calls (CPU and CUDA{bf16}; refused "
                             f"on GPUs that only emulate bfloat16); fp16: float16 autocast{scaler}, for GPUs "
                             f"without bfloat16. See docs/gpu.md.")


compile_sampler_option = click.option(
    "--compile", "compile_step", is_flag=True,
    help="torch.compile the cached sampler's per-position step (static shapes: one compilation for all positions; "
         "CUDA graphs on CUDA). Needs a C++ compiler on CPU, Triton on CUDA; pays off on GPUs.")


def check_compile_sampler(compile_step: bool, method: str, device) -> None:
    """--compile applies to the cached sampler only, and needs inductor's toolchain: both checked before any work."""
    if not compile_step:
        return
    if method != "cached":
        raise click.UsageError("--compile applies to --method cached (the naive sampler has no step to compile)")
    from vqprior.runtime.compiler import check_compiler

    check_compiler(device)


def _apply_deterministic(ctx, param, value):
    if value:  # while the options are parsed: before the command body touches CUDA (cuBLAS reads its workspace once)
        from vqprior.runtime.determinism import set_deterministic

        set_deterministic(True)
    return value


deterministic_option = click.option(
    "--deterministic", is_flag=True, expose_value=False, callback=_apply_deterministic,
    help="Deterministic algorithms (torch.use_deterministic_algorithms, cuDNN deterministic and not autotuned, a "
         "fixed cuBLAS workspace): the same results on every run on the same device model and software; slower on "
         "GPUs. See docs/exactness.md.")


def apply_precision(precision: str, device=None) -> None:
    """The precision policy for a command's whole run (vqprior.runtime.precision), set before any model call; ``device``
    refuses a precision it cannot run (bf16 on a GPU that only emulates it)."""
    from vqprior.runtime.precision import apply_precision_policy

    apply_precision_policy(precision, device)


class _TqdmHandler(logging.Handler):
    """Log records as lines on the current stderr, printed above any progress bar (tqdm.write) instead of through
    it; looked up at each record so that click's test runner captures them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break a run
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Show the library's log lines (held-out evaluations during training, skipped steps) on stderr, once."""
    logger = logging.getLogger("vqprior")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def refuse_unused(names, why: str, ctx: click.Context | None = None) -> None:
    """No option is silently ignored: a UsageError (exit 2) naming every option among ``names`` (parameter names)
    that was given a value other than its default, since here it would do nothing (``why``, e.g. "for a pixel
    model"). An option repeated at its default value (``--top-k 0``) is harmless and allowed."""
    from click.core import ParameterSource

    ctx = ctx or click.get_current_context()
    used = [p.opts[0] if p.opts else p.name for p in ctx.command.params
            if p.name in names and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)
            and ctx.params.get(p.name) != p.default]
    if used:
        raise click.UsageError(f"{', '.join(used)} {'does' if len(used) == 1 else 'do'} nothing {why}")


def cache_encoding_options(fn):
    """--cache-encoding and --jpeg-quality: how an image cache (--cache) stores its images."""
    fn = click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None,
                      help="JPEG quality of a --cache-encoding jpeg cache. [default: 90]")(fn)
    return click.option("--cache-encoding", type=click.Choice(["raw", "png", "jpeg"]), default=None,
                        help="How the --cache stores images: raw pixels, lossless PNG or lossy JPEG (decoded in the "
                             "DataLoader workers). [default: raw, or the checkpoint's]")(fn)


def resolve_cache_encoding(kw: dict, default: tuple[str, int] = ("raw", 90),
                           ctx: click.Context | None = None) -> tuple[str, int]:
    """(encoding, JPEG quality) of the image cache from the options, else ``default``; refuses them without --cache
    and --jpeg-quality for another encoding."""
    if not kw.get("cache"):
        refuse_unused(("cache_encoding", "jpeg_quality"), "without --cache", ctx)
    encoding = kw["cache_encoding"] or default[0]
    if encoding != "jpeg":
        refuse_unused(("jpeg_quality",), f"with --cache-encoding {encoding} (only JPEG has a quality)", ctx)
    return encoding, int(kw["jpeg_quality"] or default[1])


download_option = click.option(
    "--download", is_flag=True,
    help="cifar10, mnist, fashion-mnist: download into --data-dir when it holds no data (torchvision checks the "
         "archive; each split is converted once to train.npz / test.npz there).")


def load_checkpoint_split(data, dataset, data_dir, split: str, limit: int, cache, cache_encoding, jpeg_quality,
                          download: bool = False):
    """A split of the images a checkpoint was trained on (its ``DataConfig`` ``data``), or of ``dataset`` /
    ``data_dir`` when given, through the image cache ``cache`` (encoding: the options', else the checkpoint's)."""
    from vqprior.data.loader import load_image_dataset

    options = dict(cache=cache, cache_encoding=cache_encoding, jpeg_quality=jpeg_quality)
    encoding, quality = resolve_cache_encoding(options, (data.cache_encoding, data.jpeg_quality))
    name = dataset or data.dataset
    return load_image_dataset(name, split, data_dir=data_dir or (data.data_dir if name == data.dataset else None)
                              or None, image_size=data.image_size, cache=cache, limit=limit, download=download,
                              cache_encoding=encoding, jpeg_quality=quality)


def check_dataset_options(dataset: str, ctx: click.Context | None = None) -> None:
    """Data options that do not apply to ``dataset`` are errors, not silently dropped."""
    if dataset == "sample":
        refuse_unused(("data_dir",), "with --dataset sample (the bundled images need no folder)", ctx)
    from vqprior.data.download import TORCHVISION_CLASSES

    if dataset not in TORCHVISION_CLASSES:
        refuse_unused(("download",), f"with --dataset {dataset} (only {', '.join(TORCHVISION_CLASSES)} download)", ctx)


def check_outputs(*paths):
    """Fail before any work when an output folder is missing (outputs are written atomically at the end)."""
    for p in paths:
        if p is None:
            continue
        parent = Path(p).parent
        if not parent.is_dir():
            raise UserError(f"output folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise UserError(f"output folder is not writable: {parent}")
        if Path(p).is_dir():
            raise UserError(f"output path is a folder: {p}")
