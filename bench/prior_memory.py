"""What holds memory at the peak of a prior's training step: live tensors grouped by the op and source lines that
allocated them, at batch 1 and 2, and the difference (memory per image; docs/vqvae2-256.md).

One warm-up step (forward, backward; gradients kept), then one step under ``torch.profiler`` with
``profile_memory``: every allocation and free of PyTorch's CPU allocator in that step is replayed in time order, and
the allocations alive when their total peaked are grouped by (op, innermost vqprior source lines). This counts
tensors only: the C library's heap around them (what peak RSS adds, see vqprior/runtime/allocator.py) is not in it, nor
the weights, gradients and optimizer state that exist before the step (no optimizer is built). Each batch runs in a
fresh subprocess. Profiling slows the step several times; memory does not depend on it.

Usage:
    python bench/prior_memory.py                               # vqvae2-bottom at 64x64, batch 1 and 2
    python bench/prior_memory.py --checkpoint-activations
    python bench/prior_memory.py --blocks 1 --res-blocks 1     # a shallower model, for a quick look
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys


def where(event) -> str:
    """The allocating op and the innermost three vqprior source lines above an allocation event."""
    from torch._C._profiler import _EventType

    op, frames, parent = None, [], event.parent
    while parent is not None:
        if parent.tag == _EventType.TorchOp and op is None:
            op = parent.name
        if parent.tag == _EventType.PyCall and "vqprior" in parent.name:
            frames.append(parent.name.split("vqprior/")[-1])
        parent = parent.parent
    return f"{op} @ {' < '.join(frames[:3]) or '(no vqprior frame: the backward pass)'}"


def live_at_peak(prof) -> tuple[int, dict[str, int]]:
    """(peak bytes, bytes per allocation site alive at the peak) over the CPU allocations of a profile."""
    from torch._C._profiler import _EventType

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append(event)
        stack.extend(event.children)
    allocations.sort(key=lambda e: e.start_time_ns)
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in allocations:
        fields = event.extra_fields
        total += fields.alloc_size
        if fields.alloc_size > 0:
            live[fields.ptr] = event
            if total > peak:
                peak, at_peak = total, dict(live)
        else:
            live.pop(fields.ptr, None)
    groups = collections.Counter()
    for event in at_peak.values():
        groups[where(event)] += event.extra_fields.alloc_size
    return peak, dict(groups)


def profiled_step(step) -> tuple[int, dict[str, int]]:
    """One warm-up call of ``step`` (the gradients exist from there on, as in training), then one under
    ``torch.profiler``: (peak bytes of live tensors, bytes per allocation site alive at the peak)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        step()
    return live_at_peak(prof)


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd`` (a worker printing one JSON line last) in a fresh process; its parsed last line, or exit."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(args) -> dict:
    import torch

    from vqprior.config import model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    side, top_side = args.size, args.size // 2
    overrides = {k: v for k, v in dict(blocks=args.blocks, res_blocks=args.res_blocks).items() if v}
    config = model_config_from_preset(args.preset, head="codes", num_codes=512, height=side, width=side,
                                      cond_num_codes=512, cond_height=top_side, cond_width=top_side, **overrides)
    model = PixelSNAIL(config).train()
    model.checkpoint_activations = args.checkpoint_activations
    codes = torch.randint(0, 512, (args.batch, side, side))
    top = torch.randint(0, 512, (args.batch, top_side, top_side))

    def step():
        (-model.log_prob(codes, condition=top).mean()).backward()

    peak, groups = profiled_step(step)
    return dict(params=model.num_parameters(), peak=peak, groups=groups)


def main(args) -> None:
    results = {}
    for batch in (1, 2):
        cmd = [sys.executable, __file__, "--worker", "--batch", str(batch), "--preset", args.preset, "--size",
               str(args.size), "--threads", str(args.threads), "--blocks", str(args.blocks or 0),
               "--res-blocks", str(args.res_blocks or 0), "--top", str(args.top)]
        cmd += ["--checkpoint-activations"] if args.checkpoint_activations else []
        results[batch] = run_json(cmd)
    mb = 2 ** 20
    one, two = results[1], results[2]
    print(f"# bench/prior_memory.py: {args.preset} ({one['params']:,} parameters) over {args.size}x{args.size} codes, "
          f"{'--checkpoint-activations' if args.checkpoint_activations else 'no checkpointing'}; torch threads "
          f"{args.threads}")
    print(f"# command: python bench/prior_memory.py {' '.join(sys.argv[1:])}")
    print("| live tensors at the step's peak, allocated by | batch 1 MB | batch 2 MB | per image MB |")
    print("|---|---|---|---|")
    names = sorted(set(one["groups"]) | set(two["groups"]),
                   key=lambda n: two["groups"].get(n, 0) - one["groups"].get(n, 0), reverse=True)
    for name in names[:args.top]:
        a, b = one["groups"].get(name, 0) / mb, two["groups"].get(name, 0) / mb
        print(f"| `{name}` | {a:.1f} | {b:.1f} | {b - a:.1f} |")
    print(f"| **all live tensors at the peak** | {one['peak'] / mb:.1f} | {two['peak'] / mb:.1f} | "
          f"**{(two['peak'] - one['peak']) / mb:.1f}** |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vqvae2-bottom")
    p.add_argument("--size", type=int, default=64, help="side of the code map (the condition is half of it)")
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--blocks", type=int, default=0, help="override the preset's blocks (0: keep)")
    p.add_argument("--res-blocks", type=int, default=0, help="override the preset's res_blocks (0: keep)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--top", type=int, default=15, help="rows of the table (largest per-image first)")
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        main(args)
