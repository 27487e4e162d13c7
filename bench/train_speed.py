"""Training-step speed of PixelSNAIL on this CPU: images/s, peak memory, achieved FLOP/s and the attention share.

One training step = forward of ``PixelSNAIL(model_config_from_preset(p, height=32, width=32))`` (train mode, so
dropout is on; weight norm's data-dependent init on the batch first, as training does) on a batch of uint8 32x32
RGB images, loss = -log_prob(x).mean(), backward, Adam(0.95, 0.9995) step.
Each (preset, precision) runs in a fresh subprocess, so its memory peak is its own. Precision ``bf16`` runs the
forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``; backward and optimiser step run outside it.

How each number is measured:

* **s/step, images/s**: median over ``repeats`` timed steps (``time.perf_counter``) after warm-up steps. With
  ``--rounds N`` every row is measured N times, in fresh processes taking turns with the other rows (baseline,
  working tree, baseline, ...), and the round with the median s/step is reported; the speed-up is the median of the
  round-by-round ratios (round i of the tree against round i of the baseline), shown with the smallest and largest
  of them. Why: on a shared virtual machine the speed of the whole machine drifts by 20-30% over minutes, which one
  pass of rows measured one after the other turns into a speed-up or a slow-down that is not there.
* **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read right after the timed steps (before the FLOP
  counting and profiling below, which allocate their own memory); "+step" is that peak minus the RSS after importing
  torch and vqprior, i.e. model, optimiser state, activations and allocator caches.
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward+backward (matmuls, convolutions and
  attention; elementwise ops and the Adam update are not counted). The CPU's fused attention kernel is not in
  torch's FLOP registry, so its forward/backward are counted with torch's own SDPA formulas (``custom_mapping``).
  Those formulas count every attention score, masked or not: the math kernel computes them all, while a fused
  kernel called with ``is_causal=True`` would skip about half. Achieved FLOP/s = FLOPs / median step
  time, reported as a fraction of the peak measured here: median of repeated ``torch.mm`` of two 2048x2048 matrices
  (fp32 steps against the fp32 peak, bf16 steps against the bf16 peak), in its own subprocess.
* **attention share**: one extra step under ``torch.profiler``. Each CausalSelfAttention's forward is wrapped in a
  ``record_function`` range; every autograd node created inside such a range is known by its sequence number, and
  the backward events (``autograd::engine::evaluate_function: ...``) carrying those numbers are the attention's
  backward. Share = (forward ranges + those backward events) / the profiled step. "SDPA" does the same for the
  ``aten::scaled_dot_product_attention`` calls alone (the score/softmax/value part, without the gated 1x1 blocks and
  projections around it), and "kernel" names the SDPA implementation the dispatcher chose (``math`` builds explicit
  L x L score matrices; ``flash`` is the fused CPU kernel). Profiler overhead inflates small models' step times.

* **variants**: ``plain`` is the eager step; ``compile`` runs the same step through ``torch.compile`` (its compile
  time is reported separately, not in s/step); ``checkpoint`` recomputes each PixelSNAIL block in the backward pass
  (``--checkpoint-activations``), which is what its peak RSS column is for.
* **--baseline REV**: the same rows for the code at git revision REV (checked out into a temporary worktree and
  imported from there), side by side with the working tree's in one run, and the speed-up of the fastest variant
  of each (preset, precision) over the baseline's plain step. The step replicates the loop's per-step work for
  both trees: forward under autocast, backward, the non-finite gradient check, Adam, the EMA update, each done the
  way that tree's ``vqprior.training.loop`` does it (detected by what the tree provides).

Usage (the full run takes several minutes; run it on an otherwise idle machine):
    python bench/train_speed.py                      # tiny, small, paper-cifar10; fp32 and bf16
    python bench/train_speed.py --quick --presets tiny
    python bench/train_speed.py --presets small,paper-cifar10 --variants plain,compile --baseline 42ec96d
    python bench/train_speed.py --presets small,small:no-attention --precisions fp32 --baseline c62c274
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
from flops import matmul_peak, step_flops  # noqa: E402
from machine import describe_cpu  # noqa: E402
from speed_tables import format_speedups, format_table, merge_rounds  # noqa: E402

PRESETS = ("tiny", "small", "paper-cifar10")
PRECISIONS = ("fp32", "bf16")
VARIANTS = ("plain", "compile", "checkpoint")
DEFAULT_REPEATS = {"tiny": 20, "small": 10, "paper-cifar10": 3}  # paper-cifar10 takes seconds per step on 2 cores
NO_ATTENTION = ":no-attention"  # a preset name with this suffix is that preset with attention=False
BATCH, SIZE = 8, 32


# ---- worker side (runs in a fresh subprocess) ----------------------------------------------------------------------
def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_matmul_peak(spec: dict) -> dict:
    """Median FLOP/s of repeated n x n torch.mm in each of ``spec["precisions"]``, plus the machine description.
    (Only those: without bf16 hardware one 2048x2048 bf16 matmul takes about a minute.)"""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {f"peak_{name}_flops": matmul_peak(dtype, spec["matmul_size"], spec["matmul_warmup"],
                                                spec["matmul_repeats"])
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if name in spec["precisions"]}
    result.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                  cpu_capability=torch.backends.cpu.get_cpu_capability())
    return result


def _attention_ranges(model):
    """Put the work of every CausalSelfAttention in profiler ranges (instance attributes shadow the methods): its
    ``keys_values``, ``queries`` and ``attend`` where it has ``attend`` (the block calls these three directly), else
    its ``forward`` (older trees, where forward ran all three)."""
    from torch.profiler import record_function

    from vqprior.models.attention import CausalSelfAttention

    def ranged(inner):
        def method(*args, **kwargs):
            with record_function("CausalSelfAttention"):
                return inner(*args, **kwargs)
        return method

    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            names = ("keys_values", "queries", "attend") if hasattr(module, "attend") else ("forward",)
            for name in names:
                setattr(module, name, ranged(getattr(module, name)))


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def attributed_time_us(events, is_range) -> float:
    """Forward time inside ranges selected by ``is_range`` plus the backward time of the autograd nodes they created
    (matched by sequence number), in microseconds."""
    ranges = [e for e in events if is_range(e)]
    sequence_nrs = {d.sequence_nr for r in ranges for d in [r, *_descendants(r)] if d.sequence_nr >= 0}
    forward_us = sum(r.time_range.elapsed_us() for r in ranges)
    backward_us = sum(e.time_range.elapsed_us() for e in events
                      if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in sequence_nrs)
    return forward_us + backward_us


def _sdpa_kernel(events) -> str:
    names = {d.name for e in events if e.name == "aten::scaled_dot_product_attention" for d in _descendants(e)}
    kernels = sorted({"flash" if "flash" in n else "math" if "math" in n else "efficient" for n in names
                      if n.startswith("aten::_scaled_dot_product_")})
    return "+".join(kernels) or "-"


def _tree_has(module: str) -> bool:
    """Whether the imported vqprior tree has ``vqprior/<module>.py``. Not an import attempt: with PYTHONPATH on an
    older tree, the editable install's finder would supply a module that tree lacks from the working tree."""
    import vqprior

    return os.path.exists(os.path.join(os.path.dirname(vqprior.__file__), module + ".py"))


def _loop_pieces(model):
    """``(optimizer, update)``: the optimizer and the post-backward update (non-finite check, optimizer step, EMA) the
    imported tree's training loop uses; ``update(step)`` runs them after ``loss.backward()``."""
    import torch

    from vqprior.training.run_state import EMA

    ema = EMA(model, 0.9995)
    if _tree_has("acceleration"):
        from vqprior.training.acceleration import clip_and_measure, make_optimizer
    else:  # an older tree: plain Adam, one isfinite per parameter read on the host (as its loop did)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.95, 0.9995))

        def update(step):
            if all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                optimizer.step()
                ema.update(model, step)
        return optimizer, update
    optimizer = make_optimizer(model, 1e-3, (0.95, 0.9995))
    if not _tree_has("step_guard"):  # c62c274's loop: fused Adam, one fused gradient norm read on the host
        def update(step):
            if bool(torch.isfinite(clip_and_measure(list(model.parameters()), 0.0))):
                optimizer.step()
                ema.update(model, step)
        return optimizer, update

    from vqprior.training.step_guard import step_unless

    def update(step):  # the working tree: the skip decided on the device, no host sync
        skip = ~torch.isfinite(clip_and_measure(list(model.parameters()), 0.0))
        step_unless(optimizer, skip)
        ema.update(model, step, applied=(~skip).float())
    return optimizer, update


def build_step(spec: dict):
    """``(model, step, forward_backward)`` of one (preset, precision, variant), set up as the imported tree's training
    loop does: ``step()`` is one whole training step, ``forward_backward(eager=True)`` its eager forward and backward
    alone (for counting FLOPs and profiling)."""
    import contextlib

    import torch

    from vqprior.config import model_config_from_preset
    from vqprior.models.layers import data_dependent_init
    from vqprior.models.pixelsnail import PixelSNAIL

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if _tree_has("allocator"):  # as the tree's training loop does before its first step
        from vqprior.runtime.allocator import retain_freed_memory
        retain_freed_memory()
    preset = spec["preset"].removesuffix(NO_ATTENTION)
    overrides = dict(attention=False) if spec["preset"].endswith(NO_ATTENTION) else {}
    model = PixelSNAIL(model_config_from_preset(preset, height=SIZE, width=SIZE, **overrides)).train()
    x = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    # Initialised as training initialises it (weight norm's data-dependent init on the batch), so the activations
    # are in the range a training step sees. Without it the wide presets' activations grew with depth (paper-cifar10:
    # two thirds of the gate inputs beyond +-80), where float32 exp and sigmoid run many times slower on some CPUs
    # (float32 results in the subnormal range): a step no training run takes.
    data_dependent_init(model, x)
    if spec["variant"] == "checkpoint":
        model.checkpoint_activations = True
    forward = torch.compile(model) if spec["variant"] == "compile" else model
    optimizer, update = _loop_pieces(model)
    counter = [0]

    def autocast():
        if spec["precision"] == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(eager: bool = False):
        with autocast():  # as PixelTask.loss: the likelihood in fp32 from the head's parameters
            loss = -model.head.log_prob((model if eager else forward)(x).float(), x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step():
        forward_backward()
        update(counter[0])
        counter[0] += 1

    return model, step, forward_backward


def measure_training_step(spec: dict) -> dict:
    """Time, memory, FLOPs and attention share of one (preset, precision, variant) training step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import vqprior

    base_rss = _peak_rss_mib()
    model, step, forward_backward = build_step(spec)
    warm = []
    for _ in range(spec["warmup"]):
        start = time.perf_counter()
        step()
        warm.append(time.perf_counter() - start)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_rss = _peak_rss_mib()
    median = statistics.median(times)
    result = dict(preset=spec["preset"], precision=spec["precision"], variant=spec["variant"],
                  tree=spec.get("tree", "working tree"), vqprior_version=vqprior.__version__,
                  parameters=model.num_parameters(), repeats=spec["repeats"], step_s=median,
                  images_per_s=BATCH / median, peak_rss_mib=peak_rss, step_rss_mib=peak_rss - base_rss,
                  first_step_s=warm[0] if warm else None)
    if not spec.get("profile", True):
        return result

    flops = step_flops(lambda: forward_backward(eager=True))  # of the eager step (the same arithmetic)

    _attention_ranges(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("train_step"):
            step()
    events = prof.events()
    step_us = sum(e.time_range.elapsed_us() for e in events if e.name == "train_step")
    result.update(flops=flops, achieved_flops=flops / median,
                  attention_share=attributed_time_us(events, lambda e: e.name == "CausalSelfAttention") / step_us,
                  sdpa_share=attributed_time_us(events, lambda e: e.name == "aten::scaled_dot_product_attention")
                  / step_us,
                  sdpa_kernel=_sdpa_kernel(events))
    return result


# ---- parent side ---------------------------------------------------------------------------------------------------
def tree_env(tree: str | None) -> dict:
    """The environment of a worker that imports vqprior from ``tree`` (a checkout), or from this one when None."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(spec: dict, tree: str | None = None) -> dict:
    """Run one measurement in a fresh interpreter (importing vqprior from ``tree`` when given); a failure becomes
    {"error": last stderr line}."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=tree_env(tree))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkout(rev: str) -> str:
    """A temporary detached worktree of ``rev`` (removed at exit)."""
    import atexit
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tempfile.mkdtemp(prefix="vqprior-baseline-")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "-f", path, rev], check=True,
                   capture_output=True, text=True)
    atexit.register(lambda: subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path],
                                           capture_output=True))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="Comma-separated presets (default: %(default)s).")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32 and/or bf16 (default: both).")
    parser.add_argument("--variants", default="plain", help=f"Comma-separated, of {', '.join(VARIANTS)} "
                                                             "(default: %(default)s).")
    parser.add_argument("--baseline", metavar="REV", help="Also measure the plain step of git revision REV.")
    parser.add_argument("--no-profile", action="store_true",
                        help="Skip the profiled step (attention shares); FLOPs are still counted once per preset.")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"Timed steps per config (default per preset: {DEFAULT_REPEATS}).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing (default: 2).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice).")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Measure every row this many times, alternating between the trees and variants, and "
                             "report the median round (default: 1). Use 3 or more where the machine's speed drifts.")
    parser.add_argument("--quick", action="store_true", help="A smoke test: 2 repeats, 1 warm-up, small matmul.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = measure_matmul_peak(spec) if spec["task"] == "peak" else measure_training_step(spec)
        print(json.dumps(result))
        return

    def names(text, allowed, what):
        chosen = [p.strip() for p in text.split(",") if p.strip()]
        for p in chosen:
            if p.removesuffix(NO_ATTENTION) not in allowed:
                parser.error(f"unknown {what} {p!r}; choose from {', '.join(allowed)}")
        return chosen

    presets = names(args.presets, DEFAULT_REPEATS, "preset")
    precisions = names(args.precisions, PRECISIONS, "precision")
    variants = names(args.variants, VARIANTS, "variant")
    warmup = 1 if args.quick else args.warmup
    load = os.getloadavg()[0]
    peak = run_worker(dict(task="peak", threads=args.threads, precisions=precisions,
                           matmul_size=1024 if args.quick else 2048,
                           matmul_warmup=1 if args.quick else 3, matmul_repeats=3 if args.quick else 10))
    if "error" in peak:
        sys.exit(f"matmul peak measurement failed: {peak['error']}")
    trees = [("working tree", None, variants)]
    if args.baseline:
        trees.insert(0, ("baseline", checkout(args.baseline), ["plain"]))
    rows, preset_flops = [], {}
    for preset in presets:
        repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS[preset.removesuffix(NO_ATTENTION)])
        for precision in precisions:
            measured = {}  # (tree, variant) -> one row per round, the rounds alternating between trees and variants
            for round_ in range(args.rounds):
                for tree, path, tree_variants in trees:
                    for variant in tree_variants:
                        # The profiled step (and FLOP count) once per preset: the arithmetic is the same in every row.
                        profile = round_ == 0 and (not args.no_profile or preset not in preset_flops)
                        spec = dict(task="step", preset=preset, precision=precision, variant=variant, tree=tree,
                                    repeats=repeats, warmup=warmup, threads=args.threads,
                                    profile=profile and variant != "compile")
                        row = {"preset": preset, "precision": precision, "variant": variant, "tree": tree,
                               **run_worker(spec, path)}
                        if row.get("flops") and variant == "plain":
                            preset_flops[preset] = row["flops"]
                        measured.setdefault((tree, variant), []).append(row)
                        print(f"done: {tree} {preset} {precision} {variant} (round {round_ + 1})", file=sys.stderr)
            rows += [merge_rounds(rounds) for rounds in measured.values()]
    for row in rows:
        row.setdefault("preset_flops", preset_flops.get(row["preset"]))

    print(f"Machine: {describe_cpu()}; torch {peak['torch_version']} ({peak['cpu_capability']}), "
          f"{peak['torch_threads']} torch threads; 1-minute load average at start {load:.2f}.")
    n = 1024 if args.quick else 2048
    peaks = ", ".join(f"{p} {peak[f'peak_{p}_flops'] / 1e9:.1f} GFLOP/s" for p in precisions)
    print(f"Matmul peak ({n}x{n} torch.mm, median): {peaks}. Batch {BATCH}, {SIZE}x{SIZE} RGB"
          + (f"; baseline = git revision {args.baseline}." if args.baseline else ".") + "\n")
    print(format_table(rows, peak))
    if args.baseline:
        print()
        print(format_speedups(rows))


if __name__ == "__main__":
    main()
