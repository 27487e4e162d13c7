"""Planning VQ-VAE-2 training at 256x256 on one GPU: for each preset used at 256x256, its parameters, training FLOPs
per image, memory that does not grow with the batch, activation memory per image, the largest micro-batch that fits
in 24, 40 and 80 GB, and the compute time per 100,000 training images on an H100.

The presets, as the train commands use them: ``vqvae2-256`` (train-vqvae on 256x256 RGB images); ``vqvae2-top`` and
``vqvae2-top-paper`` (train-prior --level top: 32x32 codes of 512, class-conditional with 10 classes);
``vqvae2-bottom`` and ``vqvae2-bottom-paper`` (train-prior --level bottom: 64x64 codes of 512 conditioned on 32x32
top codes). Priors are planned without and with ``--checkpoint-activations``. Everything is fp32 tensors, as
``--precision fp32`` and ``tf32`` train (tf32 changes the matmul arithmetic, not the tensors).

Counted exactly (no data, no time): parameters, and the training FLOPs per image: one forward and backward of the
training loss at the full size and batch 1, run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes only,
no arithmetic) under torch's FLOP counter (``bench/flops.py``: matmuls, convolutions and attention, SDPA counted with
torch's formulas; elementwise ops, the weight-norm reparametrisation and the optimizer step are not counted). With
``--checkpoint-activations`` the count includes the forward recomputed in the backward pass.

Measured on the CPU: the live tensors at the peak of a training step (forward and backward, gradients kept from a
warm-up step), at batch 1 and batch 2. Activation memory per image = peak(batch 2) - peak(batch 1); the step's
batch-independent tensors = peak(batch 1) - that (the weight-norm weights and their gradients, mostly). The
parameters, gradients and buffers that exist before the step are not in either. Tensor bytes do not depend on the
device. Two ways, the same quantity:
* ``--method fake`` (the default): at the full size, on fake tensors under torch's ``MemTracker``
  (``torch.distributed._tools``, torch 2.5+): every tensor storage alive, by weak reference, at the largest total.
  Shapes only, no arithmetic, so even the paper priors cost seconds. tests/test_plan_256.py checks it against the
  profiler on the ``tiny`` presets.
* ``--method profiler``: ``bench/prior_memory.py``'s measurement, real tensors under ``torch.profiler``, each batch
  in a fresh subprocess. To keep each run cheap it runs at a reduced size (the priors over 16x16 codes, the VQ-VAE on
  64x64 images) and the per-image figure is scaled by the number of positions (full / measured).
Scaling by positions holds because every layer is a convolution or a 1x1 projection over the positions, and
attention runs PyTorch's fused SDPA kernels with ``is_causal`` (flash attention on the CPU; memory-efficient
attention on a GPU in fp32), whose memory is linear in the positions (no L x L score matrix is kept). The
convolutions' padded copies grow a little faster than the positions at small sizes, so the scaling overestimates
slightly. The linearity check, on ``vqvae2-top``: its per-image memory at 16x16 codes scaled by 4 against the one
at 32x32.

Computed from those (computed, not measured: no GPU ran them):
* fixed memory = 20 bytes per parameter (fp32 weights, gradients, Adam's two moments: 16; the EMA copy: 4), plus
  the step's batch-independent tensors;
* largest micro-batch in a card of C GiB = floor((usable x C - fixed) / activations per image), with ``--usable``
  (0.9 by default) leaving room for the CUDA context, cuBLAS / cuDNN workspaces and the caching allocator's
  fragmentation; 0 means the model does not fit;
* H100 hours per 100,000 images = 1e5 x FLOPs per image / (peak x utilisation): ``--peak-tflops`` 494.7 (the H100
  SXM's dense TF32 tensor-core peak, i.e. ``--precision tf32``) at ``--utilization`` 0.25 (conservative for these
  convolution-heavy models, whose uncounted elementwise ops are memory-bound on a GPU). At ``--precision fp32`` the
  H100's peak is 67 TFLOP/s: about 7 times slower.

Usage (a few minutes with fake tensors; the profiler's real steps take about 20 minutes of one core):
    python bench/plan_256.py --threads 1
    python bench/plan_256.py --json > plan.json && python bench/plan_256.py --from-json plan.json
    python bench/plan_256.py --method profiler
    python bench/plan_256.py --presets vqvae2-top --no-check   # one preset, no linearity check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import step_flops  # noqa: E402
from machine import describe_cpu  # noqa: E402
from prior_memory import profiled_step, run_json  # noqa: E402

NUM_CODES, NUM_CLASSES = 512, 10
FIXED_BYTES_PER_PARAM = 16 + 4  # weights, gradients, Adam's two moments (fp32), plus the EMA copy
CARDS_GIB = (24, 40, 80)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One preset as a train command uses it: ``kind`` is vqvae, top or bottom; ``side`` the images' (vqvae) or
    codes' side at 256x256; ``measure_side`` the reduced side memory is measured at."""

    preset: str
    kind: str
    side: int
    measure_side: int
    use: str


SPECS = (
    Spec("vqvae2-256", "vqvae", 256, 64, "train-vqvae, 256x256 images"),
    Spec("vqvae2-top", "top", 32, 16, "top prior, 32x32 codes, 10 classes"),
    Spec("vqvae2-bottom", "bottom", 64, 16, "bottom prior, 64x64 codes on 32x32 top codes"),
    Spec("vqvae2-top-paper", "top", 32, 16, "top prior, 32x32 codes, 10 classes"),
    Spec("vqvae2-bottom-paper", "bottom", 64, 16, "bottom prior, 64x64 codes on 32x32 top codes"),
)
CHECK_PRESET = "vqvae2-top"  # the linearity check: per image at its reduced size, scaled, against its full size


def build_step(preset: str, kind: str, side: int, batch: int, checkpoint: bool = False, init: bool = False):
    """(model, loss): the model as the train command builds it, over a random batch at ``side``; ``loss()`` is the
    training loss of that batch. ``init``: the VQ-VAE's codebooks initialised from the batch, as train-vqvae does
    (it reads values: not on fake tensors)."""
    import torch

    if kind == "vqvae":
        from vqprior.config import DataConfig
        from vqprior.models.vqvae import vqvae_config_from_preset
        from vqprior.training.vqvae_task import VQVAETask

        task = VQVAETask(vqvae_config_from_preset(preset, levels=2), DataConfig())
        model = task.build_model().train()
        batch_ = {"image": torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)}
        if init:
            task.init_model(model, batch_)
        return model, lambda: task.loss(model, batch_)[0]
    from vqprior.config import model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL

    cond = (dict(num_classes=NUM_CLASSES) if kind == "top" else
            dict(cond_num_codes=NUM_CODES, cond_height=side // 2, cond_width=side // 2))
    model = PixelSNAIL(model_config_from_preset(preset, head="codes", num_codes=NUM_CODES, height=side, width=side,
                                                **cond)).train()
    model.checkpoint_activations = checkpoint
    codes = torch.randint(0, NUM_CODES, (batch, side, side))
    inputs = (dict(label=torch.randint(0, NUM_CLASSES, (batch,))) if kind == "top" else
              dict(condition=torch.randint(0, NUM_CODES, (batch, side // 2, side // 2))))

    def loss():  # PixelSNAIL.log_prob without its input checks, which read values (fake tensors have none)
        return -model.head.log_prob(model(codes, **inputs).float(), codes).mean()
    return model, loss


def counted(spec: Spec, checkpoint: bool) -> dict:
    """Parameters and training FLOPs per image at the full size, on fake tensors (nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model, loss = build_step(spec.preset, spec.kind, spec.side, 1, checkpoint)
        flops = step_flops(lambda: loss().backward())
    return dict(params=sum(p.numel() for p in model.parameters()), flops_per_image=flops)


def step_peak(preset: str, kind: str, side: int, batch: int, checkpoint: bool) -> int:
    """Bytes of live tensors at the peak of a training step (``bench/prior_memory.py``)."""
    import torch

    torch.manual_seed(0)
    model, loss = build_step(preset, kind, side, batch, checkpoint, init=True)
    return profiled_step(lambda: loss().backward())[0]


def fake_step_peak(preset: str, kind: str, side: int, batch: int, checkpoint: bool) -> int:
    """``step_peak`` tracked on fake tensors by torch's ``MemTracker`` (every storage alive, by weak reference, at
    the largest total): shapes only, no arithmetic. The parameters, gradients and buffers that exist before the step
    are left out, as the profiler leaves them out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        _, loss = build_step(preset, kind, side, batch, checkpoint)
        loss().backward()  # warm-up: the gradients exist from here on
        tracker = MemTracker()
        with tracker:
            loss().backward()
        peak = tracker.get_tracker_snapshot("peak")
    held = ("Parameter", "Gradient", "Buffer")
    return sum(v for snap in peak.values() for k, v in snap.items() if k != "Total" and k.value not in held)


def measured(spec: Spec, side: int, checkpoint: bool, threads: int, method: str) -> dict:
    """Peaks at batch 1 and 2 over ``side``: on fake tensors in this process, or under the profiler each in a fresh
    subprocess."""
    peaks = {}
    for batch in (1, 2):
        if method == "fake":
            peaks[batch] = fake_step_peak(spec.preset, spec.kind, side, batch, checkpoint)
            continue
        cmd = [sys.executable, __file__, "--worker", spec.preset, spec.kind, str(side), str(batch),
               str(int(checkpoint)), "--threads", str(threads)]
        peaks[batch] = run_json(cmd)["peak"]
    return dict(side=side, peak_batch1=peaks[1], peak_batch2=peaks[2], method=method)


def per_image(memory: dict, side: int) -> float:
    """Activation bytes per image at ``side``, scaled from the measured side by the number of positions."""
    return (memory["peak_batch2"] - memory["peak_batch1"]) * (side / memory["side"]) ** 2


def max_micro_batch(card_gib: float, fixed_bytes: float, per_image_bytes: float, usable: float) -> int:
    """The largest micro-batch whose memory fits ``usable`` of a card of ``card_gib`` GiB (0: none fits)."""
    room = usable * card_gib * 2 ** 30 - fixed_bytes
    return max(0, math.floor(room / per_image_bytes))


def hours_per(images: float, flops_per_image: float, peak_tflops: float, utilization: float) -> float:
    """Compute time in hours for ``images`` training images at ``utilization`` of ``peak_tflops``."""
    return images * flops_per_image / (peak_tflops * 1e12 * utilization) / 3600


def plan_row(spec: Spec, checkpoint: bool, counts: dict, memory: dict, usable: float, peak_tflops: float,
             utilization: float) -> dict:
    """One row of the plan from the counted and measured figures."""
    activations = per_image(memory, spec.side)
    step_fixed = memory["peak_batch1"] - (memory["peak_batch2"] - memory["peak_batch1"])
    fixed = FIXED_BYTES_PER_PARAM * counts["params"] + step_fixed
    return dict(preset=spec.preset, use=spec.use, kind=spec.kind, checkpoint_activations=checkpoint, **counts,
                state_bytes=FIXED_BYTES_PER_PARAM * counts["params"], step_fixed_bytes=step_fixed,
                activation_bytes_per_image=activations, measured_at=memory["side"],
                max_micro_batch={str(c): max_micro_batch(c, fixed, activations, usable) for c in CARDS_GIB},
                h100_hours_per_100k=hours_per(1e5, counts["flops_per_image"], peak_tflops, utilization))


def format_table(rows: list[dict]) -> str:
    gib, mib = 2 ** 30, 2 ** 20
    lines = ["| preset | trained as | --checkpoint-activations | parameters | training GFLOP / image | "
             "weights + grads + Adam + EMA GiB | step's batch-independent tensors GiB | activations MiB / image | "
             + " | ".join(f"max micro-batch, {c} GB (computed)" for c in CARDS_GIB)
             + " | H100 hours / 100k images (computed, not measured) |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(CARDS_GIB) + "---|"]
    for r in rows:
        ckpt = "n/a" if r["kind"] == "vqvae" else "yes" if r["checkpoint_activations"] else "no"
        lines.append(f"| {r['preset']} | {r['use']} | {ckpt} | {r['params'] / 1e6:.1f}M | "
                     f"{r['flops_per_image'] / 1e9:,.0f} | {r['state_bytes'] / gib:.2f} | "
                     f"{r['step_fixed_bytes'] / gib:.2f} | {r['activation_bytes_per_image'] / mib:,.0f} | "
                     + " | ".join(str(r["max_micro_batch"][str(c)]) for c in CARDS_GIB)
                     + f" | {r['h100_hours_per_100k']:.2f} |")
    return "\n".join(lines)


def main(args) -> None:
    specs = [s for s in SPECS if s.preset in args.presets.split(",")]
    if not specs:
        sys.exit(f"Error: --presets names none of {', '.join(s.preset for s in SPECS)}")
    import torch

    torch.set_num_threads(args.threads)
    rows, check = [], None
    for spec in specs:
        for checkpoint in ((False,) if spec.kind == "vqvae" else (False, True)):
            side = spec.side if args.method == "fake" else spec.measure_side
            memory = measured(spec, side, checkpoint, args.threads, args.method)
            rows.append(plan_row(spec, checkpoint, counted(spec, checkpoint), memory, args.usable, args.peak_tflops,
                                 args.utilization))
            if args.check and spec.preset == CHECK_PRESET and not checkpoint:
                small = measured(spec, spec.measure_side, False, args.threads, args.method)
                full = memory if side == spec.side else measured(spec, spec.side, False, args.threads, args.method)
                check = dict(preset=spec.preset, scaled_from=spec.measure_side, measured_at=spec.side,
                             scaled_bytes=per_image(small, spec.side), measured_bytes=per_image(full, spec.side))
    assumptions = dict(usable=args.usable, peak_tflops=args.peak_tflops, utilization=args.utilization,
                       fixed_bytes_per_param=FIXED_BYTES_PER_PARAM, threads=args.threads, method=args.method,
                       machine=describe_cpu(),
                       command=" ".join(["python bench/plan_256.py"] + sys.argv[1:]))
    result = dict(rows=rows, linearity_check=check, assumptions=assumptions)
    print(json.dumps(result, indent=1) if args.json else report(result))


def report(result: dict) -> str:
    """The markdown table of a plan (``--json``'s output) with its header lines and the linearity check."""
    a, check = result["assumptions"], result["linearity_check"]
    lines = [f"# bench/plan_256.py on {a['machine']}; torch threads {a['threads']}", f"# command: {a['command']}",
             f"# memory: fp32 tensors, activations measured at reduced size and scaled by positions; fits use "
             f"{a['usable']:.0%} of each card; time: {a['utilization']:.0%} of {a['peak_tflops']} TFLOP/s (H100 SXM "
             f"dense TF32)", format_table(result["rows"])]
    if check:
        mib = 2 ** 20
        lines.append(f"\nLinearity check ({check['preset']}): activations per image at {check['measured_at']}x"
                     f"{check['measured_at']} codes scaled from {check['scaled_from']}x{check['scaled_from']}: "
                     f"{check['scaled_bytes'] / mib:,.1f} MiB; measured there: {check['measured_bytes'] / mib:,.1f} "
                     f"MiB (scaled / measured = {check['scaled_bytes'] / check['measured_bytes']:.3f})")
    return "\n".join(lines)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":  # preset kind side batch checkpoint --threads N
        import torch

        torch.set_num_threads(int(sys.argv[-1]))
        preset, kind, side, batch, checkpoint = sys.argv[2:7]
        print(json.dumps(dict(peak=step_peak(preset, kind, int(side), int(batch), bool(int(checkpoint))))))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(s.preset for s in SPECS), help="comma-separated subset")
    p.add_argument("--method", choices=("fake", "profiler"), default="fake",
                   help="fake: the full size on fake tensors; profiler: a reduced size on real tensors, scaled")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measuring subprocess")
    p.add_argument("--usable", type=float, default=0.9, help="fraction of a card's memory the training may use")
    p.add_argument("--peak-tflops", type=float, default=494.7, help="the GPU's peak (H100 SXM dense TF32)")
    p.add_argument("--utilization", type=float, default=0.25, help="the fraction of the peak assumed reached")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the linearity check")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    p.add_argument("--from-json", metavar="PATH", help="print the table of a saved --json output; measure nothing")
    args = p.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(report(json.load(f)))
    else:
        main(args)
