"""``vqprior export``: a small inference-only copy of a checkpoint (the files in checkpoints/ are made this way)."""
from __future__ import annotations

import click

from vqprior.commands.common import check_outputs, guarded


@click.command("export")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .pt file to write.")
@click.option("--fp32", is_flag=True, help="Keep float32 weights (default: stored as fp16, restored to fp32 on load).")
@guarded
def export(checkpoint, out, fp32):
    """Write CKPT's EMA weights as the model, without optimizer state or RNG: a file for sampling and
    evaluation that every command accepts like the training checkpoint (it cannot be resumed). The copy keeps the
    dataset's name but no paths of this machine (data folder, caches): give --data-dir when evaluating it."""
    from pathlib import Path

    from vqprior.checkpoint import export_checkpoint, read_checkpoint
    from vqprior.errors import UserError

    
    check_outputs(out)
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise UserError(f"--out would replace the checkpoint being exported: {out}")
    read_checkpoint(checkpoint)  # one-line errors for a missing, corrupt or foreign file before anything else
    export_checkpoint(checkpoint, out, half=not fp32)
    size_in, size_out = Path(checkpoint).stat().st_size, Path(out).stat().st_size
    click.echo(f"wrote {out} ({size_out / 2 ** 20:.1f} MiB, from {size_in / 2 ** 20:.1f} MiB; "
               f"{'fp32' if fp32 else 'fp16'} weights)")
