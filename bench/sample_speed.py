"""Naive vs cached sampling speed on this CPU: one table of median seconds per batch, speed-up and peak memory.

Every cell (model head x map size x batch x method) runs in a fresh child process, so its peak memory is the
child's peak resident set size (resource.getrusage ru_maxrss) after sampling minus the same figure just before
sampling (model built, torch loaded): the extra memory the sampler needed at its peak.

Naive sampling runs a full forward pass per position, so its cost per position does not depend on the position:
with --naive-positions N it is timed on the last N positions only (the rest given as a prefix) and the time per
batch is extrapolated to all positions; such cells are marked "extrapolated" in the table. Cached sampling is always
timed on every position.

    .venv/bin/python bench/sample_speed.py            # the full table; naive timed on 32 positions per cell
    .venv/bin/python bench/sample_speed.py --quick    # about a minute: checks that everything runs
    .venv/bin/python bench/sample_speed.py --sizes 32 --batches 16 --repeats 3 --naive-positions 32
    .venv/bin/python bench/sample_speed.py --sizes 32 --batches 16 --static   # + the static-shape and compiled steps

--static adds two columns: the cached sampler with static shapes in eager mode (``CachedSampler(static=True)``: what
``--compile`` compiles) and compiled (``sample(..., compile=True)``: inductor on CPU; compilation left out of the
timing by one untimed run at the same size first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_model(head: str, size: int, num_codes: int):
    import torch

    from vqprior.config import model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL

    torch.manual_seed(0)
    extra = dict(channels=3) if head == "pixels" else dict(head="codes", num_codes=num_codes)
    return PixelSNAIL(model_config_from_preset("small", height=size, width=size, **extra)).eval()


def run_cell(args) -> dict:
    """Child process: time one (head, size, batch, method) cell and report JSON on stdout."""
    import torch

    from vqprior.sampling.sampler import sample

    torch.set_num_threads(args.threads)
    model = build_model(args.head, args.size, args.num_codes)
    positions = args.size * args.size
    measured = positions if args.method != "naive" or args.naive_positions <= 0 \
        else min(positions, args.naive_positions)
    start = positions - measured
    shape = (args.batch, 3, args.size, args.size) if args.head == "pixels" else (args.batch, args.size, args.size)
    prefix = torch.zeros(shape, dtype=torch.uint8 if args.head == "pixels" else torch.long) if start else None
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Untimed warm-up on a 2x2 map: one-time costs (lazy initialisation) stay out of the timing, and its small
    # maps leave the memory high-water mark to the real run.
    method = "naive" if args.method == "naive" else "cached"
    extra = dict(compile=True) if args.method in ("static", "compiled") else {}
    if args.method == "static":  # the static-shape step in plain eager mode: sample(compile=True), compiling nothing
        import vqprior.sampling.sampler

        class EagerStatic(vqprior.sampling.sampler.CachedSampler):
            def compile(self, **options):
                return self

        vqprior.sampling.sampler.CachedSampler = EagerStatic
    sample(model, args.batch, method=method, height=2, width=2, **extra)
    if args.method == "compiled":  # compilation is per map size: once at the timed size, untimed
        sample(model, args.batch, method=method, prefix=prefix, start=start, **extra)
    times = []
    for r in range(args.repeats):
        g = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        sample(model, args.batch, method=method, generator=g, prefix=prefix, start=start, **extra)
        times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    median = statistics.median(times)
    return dict(seconds=median * positions / measured, measured=measured, positions=positions,
                peak_mb=(peak_kb - before_kb) / 1024)


def spawn_cell(args, head: str, size: int, batch: int, method: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", "--head", head, "--size", str(size), "--batch",
           str(batch), "--method", method, "--repeats", str(args.naive_repeats if method == "naive" else args.repeats),
           "--naive-positions", str(args.naive_positions), "--threads", str(args.threads),
           "--num-codes", str(args.num_codes)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"cell {head} {size}x{size} batch {batch} {method} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a check that everything runs: defaults become 8x8, batch 1 and 2, 1 repeat, naive on 8 "
                             "positions (options given explicitly still win)")
    parser.add_argument("--sizes", type=int, nargs="+", help="map sizes (default 16 32 64)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16)")
    parser.add_argument("--heads", nargs="+", choices=["pixels", "codes"], default=["pixels", "codes"])
    parser.add_argument("--repeats", type=int, help="cached repeats, median reported (default 3)")
    parser.add_argument("--naive-repeats", type=int, help="naive repeats, median reported (default 1)")
    parser.add_argument("--naive-positions", type=int,
                        help="time naive on at most this many positions and extrapolate; 0: all (default 32)")
    parser.add_argument("--num-codes", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--static", action="store_true",
                        help="also time the static-shape cached step, eager and compiled (two more columns)")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return

    import torch

    if args.threads <= 0:
        args.threads = torch.get_num_threads()
    defaults = dict(sizes=[8], batches=[1, 2], repeats=1, naive_repeats=1, naive_positions=8) if args.quick else \
        dict(sizes=[16, 32, 64], batches=[1, 16], repeats=3, naive_repeats=1, naive_positions=32)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
          f"{args.threads} thread(s), ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"preset small; pixels: 3 channels, logistic mixture; codes: {args.num_codes} codes. "
          f"Median seconds per batch over {args.repeats} cached / {args.naive_repeats} naive repeat(s).")
    print("peak MB = peak RSS increase while sampling (getrusage ru_maxrss, fresh process per cell)\n")
    header = (f"{'head':6} {'size':>5} {'batch':>5} {'naive s':>10} {'naive timed on':>24} {'cached s':>9} "
              f"{'cached ms/pos':>13} {'speed-up':>9} {'naive MB':>9} {'cached MB':>9}")
    if args.static:
        header += f" {'static ms/pos':>13} {'compiled ms/pos':>15}"
    print(header)
    print("-" * len(header))
    for head in args.heads:
        for size in args.sizes:
            for batch in args.batches:
                naive = spawn_cell(args, head, size, batch, "naive")
                cached = spawn_cell(args, head, size, batch, "cached")
                basis = "all positions" if naive["measured"] == naive["positions"] else \
                    f"{naive['measured']}/{naive['positions']} (extrapolated)"
                print(f"{head:6} {f'{size}x{size}':>5} {batch:>5} {naive['seconds']:>10.2f} {basis:>24} "
                      f"{cached['seconds']:>9.3f} {1e3 * cached['seconds'] / cached['positions']:>13.3f} "
                      f"{naive['seconds'] / cached['seconds']:>8.1f}x {naive['peak_mb']:>9.1f} "
                      f"{cached['peak_mb']:>9.1f}", end="")
                if args.static:
                    static, compiled = (spawn_cell(args, head, size, batch, m) for m in ("static", "compiled"))
                    print(f" {1e3 * static['seconds'] / static['positions']:>13.3f} "
                          f"{1e3 * compiled['seconds'] / compiled['positions']:>15.3f}", end="")
                print(flush=True)


if __name__ == "__main__":
    main()
