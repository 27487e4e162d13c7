"""bench/train_speed.py: a row measured in several rounds (--rounds) reports its median round, keeps the profile
of the round that was profiled, and the speed-up is the median of the ratios of round i of the tree to round i of
the baseline; the step it times is of a model initialised as training initialises it; bench/flops.py counts a
step's FLOPs, the fused CPU attention kernel included."""
from __future__ import annotations

import importlib.util

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("speed_tables", REPO / "bench" / "speed_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(tree, step_s, **extra):
    return dict(preset="small", precision="fp32", variant="plain", tree=tree, step_s=step_s, images_per_s=8 / step_s,
                step_rss_mib=100.0, **extra)


def test_rounds_report_the_median_round_and_the_round_by_round_spread():
    bench = _bench()
    base = bench.merge_rounds([_row("baseline", 0.4, flops=1e9, attention_share=0.5), _row("baseline", 0.8),
                               _row("baseline", 0.5)])
    assert base["step_s"] == 0.5 and base["images_per_s"] == 16.0
    assert base["flops"] == 1e9 and base["attention_share"] == 0.5  # from the profiled first round
    assert base["round_images_per_s"] == [20.0, 10.0, 16.0]
    tree = bench.merge_rounds([_row("working tree", 0.1), _row("working tree", 0.4), _row("working tree", 0.4)])
    assert tree["step_s"] == 0.4 and "flops" not in tree
    line = bench.format_speedups([base, tree]).splitlines()[-1]
    # Round by round: 80/20 = 4.0, 20/10 = 2.0, 20/16 = 1.25; the speed-up is their median, not 20/16 of the
    # median rounds.
    assert "| 20.00 | **2.00x** | 1.25-4.00x |" in line
    # An even count reports the lower middle round (the faster of the two middle ones).
    assert bench.merge_rounds([_row("baseline", 0.3), _row("baseline", 0.6)])["step_s"] == 0.3
    # A row that failed in every round stays a failure.
    failed = dict(preset="small", precision="fp32", variant="plain", tree="baseline", error="boom")
    assert bench.merge_rounds([failed, failed])["error"] == "boom"


def test_the_step_is_of_a_model_initialised_as_training_does():
    """The bench times a model after weight norm's data-dependent init, as every training run starts: without it the
    wide presets' activations grew into ranges where exp and sigmoid ran many times slower (docs/benchmarks.md)."""
    import torch

    from vqprior.models.layers import WNConv2d

    spec = importlib.util.spec_from_file_location("train_speed", REPO / "bench" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        model, _, _ = bench.build_step(dict(preset="tiny", precision="fp32", variant="plain"))
    finally:
        torch.set_num_threads(threads)
    convs = [m for m in model.modules() if isinstance(m, WNConv2d)]
    # Before the init g = |v| (weight() == v); the init rescales every conv to unit-scale outputs on the batch.
    assert convs and all(not torch.allclose(m.weight_g, m.weight_v.flatten(1).norm(dim=1)) for m in convs)


def _flops_module():
    spec = importlib.util.spec_from_file_location("flops", REPO / "bench" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_flops_counts_a_forward_and_backward_and_the_fused_attention():
    import torch
    import torch.nn.functional as F

    flops = _flops_module()
    linear, x = torch.nn.Linear(32, 16, bias=False), torch.randn(4, 32, requires_grad=True)
    assert flops.step_flops(lambda: linear(x).sum().backward()) == 3 * 2 * 4 * 32 * 16  # forward, grad x, grad W
    q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
    counted = flops.step_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    forward = 2 * (2 * 64 * 64 * 8)  # q k^T and the weighted sum of v, every score counted (masked or not)
    assert counted >= 3 * forward  # the CPU's fused kernel is outside torch's registry: counted, not 0
    assert flops.matmul_peak(n=64, warmup=1, repeats=1) > 0
