"""Training-step speed of the working tree against a git revision, step by step in alternation (A/B pairs).

Why: on a shared virtual machine the speed of the whole machine drifts by 20-30% within minutes (the same
``small`` step measured 0.36 to 0.49 s in one sitting), so rows timed one after the other, even in alternating
rounds (``bench/train_speed.py --rounds``), give ratios anywhere from 0.73x to 1.57x for one pair of trees. Here
the two trees' steps alternate, one at a time, so each pair of steps runs within about a second and the drift
cancels in the pair's ratio.

How: each tree runs in its own persistent worker process (``vqprior`` imported from that tree; the step is
``bench/train_speed.py``'s ``build_step``: forward, backward, the non-finite check, Adam and the EMA update, each
as that tree's training loop does them). After warm-up steps, the parent asks the workers for one timed step
at a time, alternating which tree goes first in each pair; only one worker computes at any moment. Reported per
preset: each tree's median s/step and images/s over all its steps, and the speed-up, the median over pairs of
(baseline's step time / working tree's step time), with its interquartile range.

Usage (on an otherwise idle machine; about 2 x pairs steps per preset):
    python bench/train_speed_ab.py --baseline c62c274 --presets small,small:no-attention --pairs 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_speed  # noqa: E402  (the step and the baseline checkout)
from machine import describe_cpu  # noqa: E402


def worker(spec: dict) -> None:
    """Build the step, run the warm-up, then time one step per "step" line on stdin, one JSON line per answer."""
    _, step, _ = train_speed.build_step(spec)
    for _ in range(spec["warmup"]):
        step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        step()
        print(json.dumps({"step_s": time.perf_counter() - start}), flush=True)


class Worker:
    """One tree's persistent worker process."""

    def __init__(self, spec: dict, tree: str | None):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=train_speed.tree_env(tree))
        self._answer()  # ready

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker exited early (code {self.proc.wait()}); its error is above")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._answer()["step_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure_pairs(spec: dict, baseline_tree: str, pairs: int) -> dict:
    """Alternating steps of the baseline (A) and the working tree (B); which goes first alternates by pair. The
    workers are started one after the other, each idle (blocked on its stdin) once warmed up."""
    a, b = Worker(spec, baseline_tree), Worker(spec, None)
    times_a, times_b = [], []
    try:
        for i in range(pairs):
            if i % 2 == 0:
                times_a.append(a.step())
                times_b.append(b.step())
            else:
                times_b.append(b.step())
                times_a.append(a.step())
    finally:
        a.close()
        b.close()
    ratios = sorted(ta / tb for ta, tb in zip(times_a, times_b))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return dict(preset=spec["preset"], base_s=statistics.median(times_a), tree_s=statistics.median(times_b),
                speedup=statistics.median(ratios), q1=quartiles[0], q3=quartiles[2], pairs=pairs)


def format_rows(rows: list[dict]) -> str:
    lines = ["| preset | precision | pairs | baseline s/step | images/s | working tree s/step | images/s "
             "| speed-up (median pair) | interquartile range |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['precision']} | {r['pairs']} | {r['base_s']:.3f} "
                     f"| {train_speed.BATCH / r['base_s']:.2f} | {r['tree_s']:.3f} "
                     f"| {train_speed.BATCH / r['tree_s']:.2f} | **{r['speedup']:.2f}x** "
                     f"| {r['q1']:.2f}-{r['q3']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="The git revision to compare with (required).")
    parser.add_argument("--presets", default="small,small:no-attention",
                        help="Comma-separated presets, ':no-attention' suffix allowed (default: %(default)s).")
    parser.add_argument("--precision", choices=train_speed.PRECISIONS, default="fp32")
    parser.add_argument("--pairs", type=int, default=40, help="Timed steps per tree and preset (default: 40).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per worker (default: 3).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not args.baseline:
        parser.error("--baseline REV is required")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p.removesuffix(train_speed.NO_ATTENTION) not in train_speed.DEFAULT_REPEATS:
            parser.error(f"unknown preset {p!r}")
    load = os.getloadavg()[0]
    tree = train_speed.checkout(args.baseline)
    rows = []
    for preset in presets:
        spec = dict(preset=preset, precision=args.precision, variant="plain", warmup=args.warmup,
                    threads=args.threads)
        rows.append(dict(precision=args.precision, **measure_pairs(spec, tree, args.pairs)))
        print(f"done: {preset}", file=sys.stderr)
    import torch

    print(f"Machine: {describe_cpu()}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads or torch.get_num_threads()} torch threads; "
          f"1-minute load average at start {load:.2f}. Batch {train_speed.BATCH}, {train_speed.SIZE}x"
          f"{train_speed.SIZE} RGB; baseline = git revision {args.baseline}; steps alternate A/B.\n")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
