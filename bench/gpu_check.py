"""Every vqprior command on one device, checked, in one table (issue 19 point 10): the first run on a GPU.

    python3 bench/gpu_check.py --device cuda OUT_DIR          # on one GPU, at most about 8 minutes
    python3 bench/gpu_check.py --device cpu --quick OUT_DIR   # tiny sizes, well under a minute (run by the tests)

Rows: the three train commands in each precision (fp32, tf32, bf16, fp16: "not available" where this checkout has
no such option), with --compile and with --checkpoint-activations; --resume; two --deterministic runs (identical
losses); evaluate of the shipped CIFAR-10 pixel model on the bundled test sample against the same figure computed
on the CPU by this script (within 1e-3 bits/dim); cached vs naive sampling (ms per position, the largest difference
of the conditionals, the share of equal samples) and the compiled cached step; sample / complete --compile through
the CLI; extract-codes (codes equal to a CPU extraction); compress and decompress (a round trip, and the CPU
refusing a GPU-made file before decoding); torchrun with 2 processes where 2 GPUs exist. Each row: command,
status (ok / FAIL / skipped and why), seconds, the figure checked. The table is printed and written to
OUT_DIR/gpu_check.md; rows past the time budget (--budget-minutes) are skipped, not run.

Where lmdb or constriction are missing (the lent H200 machine has torch, click, tqdm, pillow, numpy but neither of
them, and cannot download): fetch their wheels here into an ignored folder carried along, and install them and
this checkout there before the run (see /work/.library/device/README.md, "carry"):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl lmdb constriction
    # on the GPU machine, with carry=[".whl"]:
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . \\
        && export PYTHONPATH=/tmp/site && python3 bench/gpu_check.py --device cuda $OUT

Without constriction the compress rows are skipped (with the reason); lmdb is needed by extract-codes and the
prior rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "checkpoints"
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TRAIN_COMMANDS = ("train-pixels", "train-prior", "train-vqvae")


class Skip(Exception):
    """A row that does not apply here (the reason is the message)."""


class Check:
    """Runs rows, times them, keeps the table; rows past the budget are skipped."""

    def __init__(self, args, work: Path):
        self.args, self.work, self.rows = args, work, []
        self.deadline = time.monotonic() + 60 * args.budget_minutes

    def row(self, command: str, fn, *a) -> object:
        if time.monotonic() > self.deadline:
            self.rows.append((command, "skipped: past the time budget", 0.0, ""))
            return None
        t0 = time.perf_counter()
        result = None
        try:
            result = fn(*a)
            status, figure = "ok", result if isinstance(result, str) else getattr(result, "figure", "")
        except Skip as e:
            status, figure = f"skipped: {e}", ""
        except Exception as e:  # noqa: BLE001 - one row's failure is that row's FAIL, the rest still run
            status, figure = "FAIL", " ".join(f"{type(e).__name__}: {e}".split())[:300]
        self.rows.append((command, status, time.perf_counter() - t0, figure))
        print(f"{status.split(':')[0]:8} {time.perf_counter() - t0:7.1f}s  {command}  {figure}", flush=True)
        return result

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


def has_option(command: str, option: str, value: str | None = None) -> bool:
    from vqprior.commands.cli import cli

    for p in cli.commands[command].params:
        if option in p.opts:
            return value is None or value in getattr(p.type, "choices", ())
    return False


def last_metrics(run: Path, split: str = "train") -> dict:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("split") == split]
    if not records:
        raise RuntimeError(f"no {split} record in {run / 'metrics.jsonl'}")
    return records[-1]


def loss_figure(run: Path) -> str:
    r = last_metrics(run)
    values = {k: v for k, v in r.items() if k not in ("step", "split", "lr", "skipped_steps", "train_seconds")}
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite {', '.join(bad)} at step {r['step']}")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "items_per_s")
    return f"step {r['step']}: {shown}, {r.get('items_per_s', 0):.0f} items/s"


# ---- the rows ----------------------------------------------------------------------------------------------------

def train_args(c: Check, command: str) -> list:
    quick = c.args.quick
    common = ["--steps", 4 if quick else 30, "--batch-size", 4 if quick else 32, "--eval-every", 1000,
              "--sample-every", 1000, "--eval-limit", 4 if quick else 64, "--num-samples", 2, "--quiet",
              "--device", c.args.device]
    if command == "train-pixels":
        size = ["--image-size", 8] if quick else []
        return ["--dataset", "sample", "--limit", 16 if quick else 512, "--preset", "tiny" if quick else "small",
                *size, *common]
    if command == "train-prior":
        return ["--codes", c.work / "codes-train.lmdb", "--level", "top", "--preset", "tiny" if quick else "small",
                *common]
    size = ["--image-size", 8] if quick else []
    return ["--dataset", "sample", "--limit", 16 if quick else 512, "--preset", "tiny" if quick else "small", *size,
            *common]


def train_row(c: Check, command: str, *extra) -> str:
    if "--precision" in extra:
        precision = extra[extra.index("--precision") + 1]
        if not has_option(command, "--precision", precision):
            raise Skip(f"not available: --precision {precision} is not an option of this checkout")
        if precision == "fp16" and c.args.device == "cpu":
            raise Skip("fp16 is a GPU precision")
    if "--compile" in extra and c.args.device == "cpu" and c.args.quick:
        raise Skip("--quick on the CPU: inductor's C++ build takes minutes")
    if "--checkpoint-activations" in extra and command == "train-vqvae":
        raise Skip("refused by design: recomputation applies to PixelSNAIL models (pixels and priors)")
    if command == "train-prior" and not (c.work / "codes-train.lmdb").exists():
        raise Skip("no code cache (the extract-codes row failed or was skipped)")
    run = c.work / f"{command}-{len(c.rows)}"
    c.cli(command, *train_args(c, command), *extra, "--out", run)
    return loss_figure(run)


def resume_row(c: Check) -> str:
    run = c.work / "resume"
    args = train_args(c, "train-pixels")
    steps = int(args[args.index("--steps") + 1])
    c.cli("train-pixels", *args, "--out", run)
    args[args.index("--steps") + 1] = steps + 2
    c.cli("train-pixels", *args, "--out", run, "--resume")
    step = last_metrics(run)["step"]
    if step != steps + 2:
        raise RuntimeError(f"the resumed run's last record is step {step}, not {steps + 2}")
    return f"resumed from step {steps} to {step}; " + loss_figure(run)


def deterministic_row(c: Check) -> str:
    runs = []
    for i in range(2):
        run = c.work / f"deterministic-{i}"
        c.cli("train-pixels", *train_args(c, "train-pixels"), "--deterministic", "--out", run)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs.append([{k: v for k, v in r.items() if k not in ("items_per_s", "train_seconds")} for r in records])
    if runs[0] != runs[1]:
        raise RuntimeError(f"two --deterministic runs differ: {runs[0][-1]} vs {runs[1][-1]}")
    last = {k: v for k, v in runs[0][-1].items() if k not in ("step", "split", "lr", "skipped_steps")}
    return f"two runs, identical metrics at every logged step (last: {last})"


def bits_per_dim(output: str) -> float:
    return float(output.split()[0])


def evaluate_row(c: Check) -> str:
    model = CHECKPOINTS / "cifar10-pixels-small.pt"
    limit = 8 if c.args.quick else 100
    args = ["evaluate", model, "--dataset", "sample", "--limit", limit, "--quiet"]
    here = bits_per_dim(c.cli(*args, "--device", c.args.device))
    cpu = bits_per_dim(c.cli(*args, "--device", "cpu"))
    if abs(here - cpu) > 1e-3:
        raise RuntimeError(f"{here:.5f} bits/dim on {c.args.device} vs {cpu:.5f} on the CPU")
    return f"{here:.4f} bits/dim on {c.args.device}, {cpu:.4f} on the CPU (first {limit} sample test images)"


def sampling_row(c: Check, compiled: bool) -> str:
    """Cached vs naive (or compiled vs eager cached) on the shipped pixel model, on the last rows of a real image."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.data.loader import load_image_dataset
    from vqprior.sampling.cached import CachedSampler
    from vqprior.sampling.sampler import sample

    device = torch.device(c.args.device)
    # The --quick CPU check compiles with the eager backend (inductor's C++ build takes minutes), so that this
    # row's code runs in the test suite; everywhere else inductor, with CUDA graphs on CUDA.
    options = {"backend": "eager"} if c.args.quick and device.type == "cpu" else \
        {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    model = load_model(CHECKPOINTS / "cifar10-pixels-small.pt", device, kind="pixels")
    batch = 2 if c.args.quick else 16
    ds = load_image_dataset("sample", "test", limit=batch)
    images = torch.stack([ds[i]["image"] for i in range(batch)]).to(device)
    H, W = model.config.height, model.config.width
    start = H * W - (W if c.args.quick else 4 * W)  # the last rows are sampled, the rest is the real image

    def timed(**kw):
        g = torch.Generator(device=device).manual_seed(0)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = sample(model, batch, generator=g, prefix=images, start=start, **kw)
        sync()
        return out, 1e3 * (time.perf_counter() - t0) / (H * W - start)

    # Conditionals: the cached (or compiled) step against a full forward pass on the same prefix.
    worst = 0.0
    with torch.no_grad():
        s = CachedSampler(model.eval(), batch, static=compiled)
        if compiled:
            s.compile(**options)
        s.prefill(images, start)
        for p in range(start, H * W):
            known = images.clone()
            known.view(batch, -1, H * W)[:, :, p:] = 0
            full = model(known)[:, :, p // W, p % W]
            worst = max(worst, float((s.step(p) - full).abs().max()))
            s.append(p, images[:, :, p // W, p % W])
    if compiled:
        from torch._dynamo.utils import counters

        timed(compile=options)  # compilation, untimed
        ref, ms_ref = timed(method="cached")
        out, ms = timed(compile=options)
        skips = sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))
        equal = float((out == ref).flatten(1).all(1).float().mean())
        how = "eager backend, " if options.get("backend") == "eager" else ""
        return (f"compiled ({how}static shapes) {ms:.3f} ms/pos vs eager cached {ms_ref:.3f}; conditionals within "
                f"{worst:.2e} of a full forward; {100 * equal:.0f}% of samples equal to eager cached; CUDA graph "
                f"skips {skips}")
    cached, ms_cached = timed(method="cached")
    naive, ms_naive = timed(method="naive")
    equal = float((cached == naive).flatten(1).all(1).float().mean())
    if worst > 1e-3:
        raise RuntimeError(f"cached conditionals differ from a full forward by {worst:.2e}")
    return (f"cached {ms_cached:.3f} ms/pos, naive {ms_naive:.3f} ms/pos (batch {batch}); conditionals within "
            f"{worst:.2e}; {100 * equal:.0f}% of samples identical")


def sample_cli_row(c: Check, command: str) -> str:
    if c.args.device == "cpu" and c.args.quick:
        raise Skip("--quick on the CPU: inductor's C++ build takes minutes")
    model = CHECKPOINTS / "cifar10-pixels-small.pt"
    out = c.work / f"{command}-compile.png"
    if command == "sample":
        text = c.cli("sample", model, "--num", 4, "--compile", "--quiet", "--out", out, "--device", c.args.device)
    else:
        image = c.work / "complete-in.png"
        c.cli("sample", model, "--num", 1, "--quiet", "--out", image, "--device", c.args.device)
        text = c.cli("complete", model, "--image", image, "--keep-rows", 16, "--num", 4, "--compile", "--quiet",
                     "--out", out, "--device", c.args.device)
    return text.strip().splitlines()[-1]


def extract_row(c: Check) -> str:
    import numpy as np

    from vqprior.data.codes import CodeDataset

    vq = CHECKPOINTS / "cifar10-vqvae.pt"
    limit = 8 if c.args.quick else 256
    for split in ("train", "test"):
        c.cli("extract-codes", "--vqvae", vq, "--dataset", "sample", "--split", split, "--limit", limit, "--quiet",
              "--out", c.work / f"codes-{split}.lmdb", "--device", c.args.device)
    c.cli("extract-codes", "--vqvae", vq, "--dataset", "sample", "--split", "test", "--limit", limit, "--quiet",
          "--out", c.work / "codes-cpu.lmdb", "--device", "cpu")
    here, cpu = CodeDataset(c.work / "codes-test.lmdb"), CodeDataset(c.work / "codes-cpu.lmdb")
    total = same = 0
    for i in range(len(cpu)):
        for level in cpu.level_names:
            a, b = np.asarray(here[i][level]), np.asarray(cpu[i][level])
            total, same = total + a.size, same + int((a == b).sum())
    if same != total:
        raise RuntimeError(f"{total - same} of {total} codes differ from the CPU extraction")
    return f"{total} codes ({len(cpu)} images, {', '.join(cpu.level_names)}) equal to the CPU extraction"


def compress_row(c: Check) -> str:
    import numpy as np

    from vqprior.data.loader import load_image_dataset

    try:
        import constriction  # noqa: F401
    except ImportError:
        raise Skip("constriction is not installed (see this script's header)") from None
    model = CHECKPOINTS / "cifar10-pixels-small.pt"
    n = 2 if c.args.quick else 8
    ds = load_image_dataset("sample", "test", limit=n)
    images = np.stack([ds[i]["image"].numpy() for i in range(n)])
    np.save(c.work / "images.npy", images)
    packed, back = c.work / "images.vqz", c.work / "back.npy"
    text = c.cli("compress", model, c.work / "images.npy", "--out", packed, "--device", c.args.device)
    c.cli("decompress", model, packed, "--out", back, "--device", c.args.device)
    if not np.array_equal(np.load(back), images):
        raise RuntimeError("decompressed images differ from the originals")
    figure = text.split("=")[-1].strip().split(" (")[0]
    if c.args.device != "cpu":
        try:
            c.cli("decompress", model, packed, "--out", c.work / "cpu.npy", "--device", "cpu")
        except RuntimeError as e:
            if "compressed on" not in str(e):
                raise
            figure += "; the CPU refuses the file before decoding"
        else:
            figure += "; the CPU decoded it too (bitwise equal arithmetic)"
    return f"{n} images round trip at {figure}"


def torchrun_row(c: Check) -> str:
    import torch

    if c.args.device != "cuda" or torch.cuda.device_count() < 2:
        raise Skip("needs 2 GPUs" if c.args.device == "cuda" else "the CPU check does not start processes")
    run = c.work / "torchrun"
    args = [str(a) for a in train_args(c, "train-pixels")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vqprior.commands.cli", "train-pixels", *args, "--out", str(run)],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
    return loss_figure(run)


# ---- the table -----------------------------------------------------------------------------------------------------

def machine(device: str) -> str:
    import torch

    text = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        return f"{name} x{torch.cuda.device_count()}, CUDA {torch.version.cuda}, cuDNN " \
               f"{torch.backends.cudnn.version()}, {text}"
    from machine import cpu_name
    return f"CPU {cpu_name()} ({os.cpu_count()} cores), {text}"


def table(rows, header: str) -> str:
    lines = [header, "", "| command | status | seconds | figure checked |", "|---|---|---|---|"]
    for command, status, seconds, figure in rows:
        lines.append(f"| `{command}` | {status} | {seconds:.1f} | {figure.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def run_all(c: Check) -> None:
    """The compiling rows come last: they are the slowest, so a tight budget cuts them first."""
    d = c.args.device
    c.row(f"extract-codes --device {d} (vs --device cpu)", extract_row, c)
    for command in TRAIN_COMMANDS:
        for precision in PRECISIONS:
            c.row(f"{command} --precision {precision}", train_row, c, command, "--precision", precision)
        c.row(f"{command} --checkpoint-activations", train_row, c, command, "--checkpoint-activations")
    c.row("train-pixels --resume", resume_row, c)
    c.row("train-pixels --deterministic (twice)", deterministic_row, c)
    c.row(f"evaluate cifar10-pixels-small.pt --device {d} (vs cpu)", evaluate_row, c)
    c.row("sampling: cached vs naive", sampling_row, c, False)
    c.row("compress / decompress", compress_row, c)
    c.row("torchrun --nproc-per-node 2 train-pixels", torchrun_row, c)
    c.row("sampling: compiled cached step", sampling_row, c, True)
    c.row("sample --compile", sample_cli_row, c, "sample")
    c.row("complete --compile", sample_cli_row, c, "complete")
    for command in TRAIN_COMMANDS:
        c.row(f"{command} --compile", train_row, c, command, "--compile")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for gpu_check.md (created)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite runs it on the CPU)")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="skip rows that would start later")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("Error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    c = Check(args, work)
    try:
        run_all(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (f"# vqprior GPU check ({'quick, ' if args.quick else ''}--device {args.device})\n\n"
              f"{machine(args.device)}; started {started}; `python3 bench/gpu_check.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    text = table(c.rows, header)
    (out / "gpu_check.md").write_text(text)
    print("\n" + text)
    return 1 if any(status == "FAIL" for _, status, _, _ in c.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
