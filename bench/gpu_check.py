"""Every vqprior command on one device, checked, in one table: the first run on a GPU (docs/gpu.md, "The GPU check").

    timeout 560 python3 bench/gpu_check.py --device cuda OUT_DIR   # on one GPU: at most --budget-minutes (7)
    python3 bench/gpu_check.py --device cpu --quick OUT_DIR        # tiny sizes, under a minute (run by the tests)

Rows, in order (the compiling rows last: the slowest, so a tight budget cuts them first): extract-codes against a
CPU extraction; the three train commands in each precision and with --checkpoint-activations (peak GPU memory);
--resume; --deterministic twice; evaluate against the CPU and bf16 / fp16 against fp32; cached vs naive sampling;
compress / decompress; host syncs of a training step; one step of the vqvae2-top and vqvae2-bottom priors (img/s,
memory, attention kernel); two-level prior sampling and prior compression in fresh processes; torchrun with 2
GPUs; the compiled cached step, sample / complete --compile and the train commands with --compile. Every row has
a fail condition (its function's docstring in bench/gpu_rows.py or bench/gpu_rows_extra.py).

Budgets are hard: each row gets its own (seconds, below) but never more than what is left of --budget-minutes,
and is interrupted (FAIL: over its budget) when it runs past it; a row that would start with less than
MIN_START_S left is skipped. Each row is appended to OUT_DIR/gpu_check.md when it ends, so a run killed from
outside leaves every finished row; a watchdog ends the process (after writing one last row) if a row stuck in
native code ignores its interruption. Exit status 1 when any row failed.

Where lmdb or constriction are missing (a GPU machine without network): fetch their wheels into an ignored
folder carried along and install them with this checkout there first (docs/gpu.md has the commands). Without
constriction the compress rows are skipped (with the reason); lmdb is needed by extract-codes and the prior rows.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# cuBLAS takes its workspace setting at the first GPU matrix product; the deterministic rows need this one.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from gpu_rows import (  # noqa: E402 - after the environment setting above
    Skip,
    compress_row,
    deterministic_row,
    evaluate_row,
    extract_row,
    resume_row,
    sample_cli_row,
    sampling_row,
    torchrun_row,
    train_row,
)
from gpu_rows_extra import (  # noqa: E402
    precision_eval_row,
    prior_compress_row,
    prior_step_row,
    sync_row,
    two_level_sample_row,
)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TRAIN_COMMANDS = ("train-pixels", "train-prior", "train-vqvae")
MIN_START_S = 5.0  # a row that would have less than this left is skipped, not started
WATCHDOG_GRACE_S = 30.0
QUICK_ROOM = 10.0  # past the overall budget by this much, the watchdog ends the process


class RowTimeout(BaseException):
    """Raised in the main thread when a row runs past its budget (BaseException: no row's handler catches it)."""


class Peak:
    """Peak GPU memory over a ``with c.peak_memory()`` block; ``text()`` is empty on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.bytes = cuda, 0

    def text(self) -> str:
        return f"; peak GPU memory {self.bytes / 2 ** 30:.2f} GiB" if self.cuda else ""


class Check:
    """Runs rows under their budgets, appending each to the table as it ends."""

    def __init__(self, args, work: Path, table: Path):
        self.args, self.work, self.table, self.count = args, work, table, 0
        self.deadline = time.monotonic() + 60 * args.budget_minutes
        self.failed = False

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def peak_memory(self):
        import torch

        peak = Peak(self.args.device.startswith("cuda"))
        if peak.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        yield peak
        if peak.cuda:
            torch.cuda.synchronize()
            peak.bytes = torch.cuda.max_memory_allocated()

    def row(self, command: str, budget_s: float, fn, *a) -> None:
        self.count += 1
        if self.args.only and not any(text in command for text in self.args.only):
            return
        # --quick's tiny rows on a shared CPU: the budgets sized for a GPU, with room for a loaded machine.
        limit = min(budget_s * (QUICK_ROOM if self.args.quick else 1.0), self.seconds_left())
        if limit < MIN_START_S:
            return self.write(command, "skipped: past the overall budget", 0.0, "")
        t0 = time.perf_counter()

        def over(signum, frame):
            raise RowTimeout(f"over its budget of {limit:.0f} s")

        previous = signal.signal(signal.SIGALRM, over)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            figure, status = fn(*a), "ok"
        except Skip as e:
            figure, status = "", f"skipped: {e}"
        except (Exception, RowTimeout) as e:  # noqa: BLE001 - one row's failure is that row's FAIL
            figure, status = " ".join(f"{type(e).__name__}: {e}".split())[:400], "FAIL"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        self.write(command, status, time.perf_counter() - t0, figure)

    def write(self, command: str, status: str, seconds: float, figure: str) -> None:
        self.failed |= status == "FAIL"
        line = f"| `{command}` | {status} | {seconds:.1f} | {figure.replace('|', '/')} |\n"
        with open(self.table, "a") as f:  # appended and closed: a killed run keeps every finished row
            f.write(line)
        print(f"{status.split(':')[0]:8} {seconds:7.1f}s  {command}  {figure}", flush=True)

    # ---- running commands ----------------------------------------------------------------------------------------
    def cli(self, *args) -> str:
        """``vqprior ARGS`` in this process; the output, or a RuntimeError with its Error: line."""
        import torch
        from click.testing import CliRunner

        from vqprior.commands.cli import cli

        saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
        try:
            result = CliRunner().invoke(cli, [str(a) for a in args])
        finally:  # --deterministic is process-wide: one row must not change the next
            torch.use_deterministic_algorithms(saved[0])
            torch.backends.cudnn.deterministic = saved[1]
        if result.exit_code != 0:
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")] or result.output.splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit {result.exit_code}")
        return result.output


def run_all(c: Check) -> None:
    """The rows and their budgets in seconds, sized for one H100."""
    d = c.args.device
    c.row(f"extract-codes --device {d} (vs --device cpu)", 40, extract_row, c)
    for command in TRAIN_COMMANDS:
        for precision in PRECISIONS:
            c.row(f"{command} --precision {precision}", 20, train_row, c, command, "--precision", precision)
        c.row(f"{command} --checkpoint-activations", 20, train_row, c, command, "--checkpoint-activations")
    c.row("train-pixels --resume", 25, resume_row, c)
    c.row("train-pixels --deterministic (twice)", 30, deterministic_row, c)
    c.row(f"evaluate cifar10-pixels-small.pt --device {d} (vs cpu)", 30, evaluate_row, c)
    for precision in ("bf16", "fp16"):
        c.row(f"evaluate --precision {precision} (vs fp32)", 20, precision_eval_row, c, precision)
    c.row("sampling: cached vs naive", 25, sampling_row, c, False)
    c.row("compress / decompress", 30, compress_row, c)
    c.row("host syncs of training steps (set_sync_debug_mode)", 40, sync_row, c)
    for preset in ("vqvae2-top", "vqvae2-bottom"):
        c.row(f"{preset}: one training step, batch 4", 45, prior_step_row, c, preset)
    c.row("sample top + bottom prior (fresh process)", 45, two_level_sample_row, c)
    c.row("compress / decompress with the priors (fresh processes)", 60, prior_compress_row, c)
    c.row("torchrun --nproc-per-node 2 train-pixels", 60, torchrun_row, c)
    c.row("sampling: compiled cached step", 90, sampling_row, c, True)
    c.row("sample --compile", 60, sample_cli_row, c, "sample")
    c.row("complete --compile", 60, sample_cli_row, c, "complete")
    for command in TRAIN_COMMANDS:
        c.row(f"{command} --compile", 75, train_row, c, command, "--compile")


def machine(device: str) -> str:
    import torch

    text = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda"):
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
        return (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, driver {driver}, CUDA "
                f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {text}")
    from machine import cpu_name
    return f"CPU {cpu_name()} ({os.cpu_count()} cores), {text}"


def watchdog(c: Check) -> threading.Thread:
    """Ends the process when it is past the overall budget by WATCHDOG_GRACE_S: a row stuck in native code never
    sees its interruption. The table gets one last row saying so."""

    def watch():
        while c.seconds_left() > -WATCHDOG_GRACE_S:
            time.sleep(1.0)
        c.write("(the row running then)", "FAIL", 0.0, "the check overran its overall budget and was ended")
        os._exit(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for gpu_check.md (created)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite runs it on the CPU)")
    parser.add_argument("--budget-minutes", type=float, default=7.0, help="hard limit of the whole check")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the rows whose command contains TEXT (repeatable): a rerun of failed rows")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        from vqprior.runtime.device import cuda_unusable

        print(f"Error: --device {args.device} but {cuda_unusable() or 'CUDA is not available'}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "gpu_check.md"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table.write_text(f"# vqprior GPU check ({'quick, ' if args.quick else ''}--device {args.device})\n\n"
                     f"{machine(args.device)}; started {started}; `python3 bench/gpu_check.py {command}`\n\n"
                     "| command | status | seconds | figure checked |\n|---|---|---|---|\n")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    c = Check(args, work, table)
    watchdog(c)
    try:
        run_all(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table.read_text())
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
