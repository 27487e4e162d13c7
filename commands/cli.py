"""The ``vqprior`` command group. Each command lives in its own module beside this one; this file only wires them
and adds what every command shares (``--threads``).

Command modules import torch and the library lazily inside their bodies so ``vqprior --help`` stays fast.
"""
import sys

import click

from vqprior import __version__
from vqprior.commands.complete import complete
from vqprior.commands.compress import compress, decompress
from vqprior.commands.decode import decode
from vqprior.commands.evaluate import evaluate
from vqprior.commands.export import export
from vqprior.commands.extract_codes import extract_codes
from vqprior.commands.info import info, presets
from vqprior.commands.plot import plot
from vqprior.commands.receptive_field import receptive_field
from vqprior.commands.sample import sample
from vqprior.commands.score import ood_eval, score
from vqprior.commands.train_pixels import train_pixels
from vqprior.commands.train_prior import train_prior
from vqprior.commands.train_vqvae import train_vqvae


def _print_version(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    click.echo(f"vqprior {__version__}, torch {torch.__version__}, default device {device}")
    ctx.exit()


def _set_threads(ctx, param, value):
    if value is not None and not ctx.resilient_parsing:
        import torch

        torch.set_num_threads(value)
        ctx.meta.setdefault("vqprior.shared_options", {})[param.name] = value  # so a resume can echo it
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the vqprior and torch versions and the device --device auto picks, then exit.")
def cli():
    """PixelSNAIL autoregressive image priors: pixel density models and VQ-VAE code priors.

    \b
    Pixels:   train-pixels -> evaluate -> sample / complete
    Priors:   train-vqvae -> extract-codes -> train-prior -> sample -> decode
    Sharing:  export (a small fp16 inference copy of any checkpoint)
    Looking:  info CKPT or CACHE, presets, evaluate VQVAE.pt, receptive-field
    Coding:   compress / decompress (lossless files of -log2 p(x) bits)
    OOD:      score (per-image bits, likelihood ratio, input complexity) -> ood-eval (AUROC, AUPR, FPR95)
    Curves:   plot (held-out and training metrics of run folders)
    """


for command in (train_pixels, train_vqvae, extract_codes, train_prior, evaluate, sample, complete, decode,
                receptive_field, export, info, presets, compress, decompress, plot, score, ood_eval):
    command.params.append(click.Option(
        ["--threads"], type=click.IntRange(min=1), default=None, expose_value=False, callback=_set_threads,
        help="CPU threads for torch (torch.set_num_threads; default: torch's choice)."))
    cli.add_command(command)


def main():
    from vqprior.commands.common import report_bugs
    from vqprior.runtime.allocator import retain_freed_memory

    retain_freed_memory()  # every command here is a process that runs one job: keep freed memory for reuse
    sys.excepthook = report_bugs  # a bug's traceback ends with one line asking to report it
    cli()


if __name__ == "__main__":  # python -m vqprior.commands.cli (the tests start training as a subprocess)
    main()
