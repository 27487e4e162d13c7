"""The ``vqprior`` command group. Each command lives in its own module beside this one; this file only wires them.

Command modules import torch and the library lazily inside their bodies so ``vqprior --help`` stays fast.
"""
import click

from vqprior import __version__

from .complete import complete
from .decode import decode
from .evaluate import evaluate
from .export import export
from .extract_codes import extract_codes
from .plot import plot
from .receptive_field import receptive_field
from .sample import sample
from .train_pixels import train_pixels
from .train_prior import train_prior
from .train_vqvae import train_vqvae


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vqprior")
def cli():
    """PixelSNAIL autoregressive image priors: pixel density models and VQ-VAE code priors.

    \b
    Pixels:   train-pixels -> evaluate -> sample / complete
    Priors:   train-vqvae -> extract-codes -> train-prior -> sample -> decode
    Sharing:  export (a small fp16 inference copy of any checkpoint)
    Curves:   plot (held-out and training metrics of run folders)
    """


for command in (train_pixels, train_vqvae, extract_codes, train_prior, evaluate, sample, complete, decode,
                receptive_field, export, plot):
    cli.add_command(command)


def main():
    cli()


if __name__ == "__main__":  # python -m vqprior.commands.cli (the tests start training as a subprocess)
    main()
