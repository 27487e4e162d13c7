"""bench/plan_256.py: the FLOPs it counts on fake tensors are the FLOPs of the same step on real tensors (the
recomputation of --checkpoint-activations included), its parameter counts are the models', the step's memory peak
tracked on fake tensors is the profiler's, and its fit and time columns follow their formulas (checked against
numbers worked by hand)."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def plan():
    sys.path.insert(0, str(REPO / "bench"))  # plan_256 imports its sibling bench scripts
    spec = importlib.util.spec_from_file_location("plan_256", REPO / "bench" / "plan_256.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_256"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["plan_256"]
    sys.path.remove(str(REPO / "bench"))


TINY = {"vqvae": ("tiny", "vqvae", 16, 8), "top": ("tiny", "top", 8, 4), "bottom": ("tiny", "bottom", 8, 4)}


@pytest.mark.parametrize("kind", ["vqvae", "top", "bottom"])
def test_counts_on_fake_tensors_are_the_real_steps(plan, kind):
    preset, kind, side, measure_side = TINY[kind]
    spec = plan.Spec(preset, kind, side, measure_side, "test")
    for checkpoint in (False, True):
        counts = plan.counted(spec, checkpoint)
        torch.manual_seed(0)
        model, loss = plan.build_step(preset, kind, side, 1, checkpoint, init=True)
        assert counts["params"] == sum(p.numel() for p in model.parameters())
        assert counts["flops_per_image"] == plan.step_flops(lambda: loss().backward()) > 0
    if kind != "vqvae":  # the forward recomputed in the backward pass is counted
        assert plan.counted(spec, True)["flops_per_image"] > plan.counted(spec, False)["flops_per_image"]


def test_fake_tensor_peaks_are_the_profilers(plan):
    # The live tensors at the step's peak, tracked on fake tensors, against the profiler's count of real allocations
    # (which also sees the kernels' small internal buffers): the same within a few KB, at each batch.
    peaks = {m: [f("tiny", "bottom", 8, b, False) for b in (1, 2)] for m, f in
             (("fake", plan.fake_step_peak), ("profiler", plan.step_peak))}
    assert peaks["profiler"][1] > peaks["profiler"][0] > 0
    for fake, real in zip(peaks["fake"], peaks["profiler"]):
        assert abs(fake - real) < 0.01 * real
    per_image = [two - one for one, two in peaks.values()]
    assert abs(per_image[0] - per_image[1]) < 0.01 * per_image[1]


def test_fit_and_time_columns_against_hand_computed_values(plan):
    gib = 2 ** 30
    # 24 GiB at 90%: 21.6 GiB; minus 4 GiB fixed: 17.6 GiB of 1 GiB images -> 17. A fixed part above the room: 0.
    assert plan.max_micro_batch(24, 4 * gib, gib, 0.9) == 17
    assert plan.max_micro_batch(24, 22 * gib, gib, 0.9) == 0
    assert plan.max_micro_batch(24, 0, 6 * gib, 1.0) == 4  # exactly full still fits
    # 1e5 images x 1e12 FLOPs at 25% of 500 TFLOP/s: 1e17 / 1.25e14 = 800 s.
    assert plan.hours_per(1e5, 1e12, 500, 0.25) == pytest.approx(800 / 3600)

    # A row: 2**28 parameters -> 5 GiB of weights, gradients, Adam and EMA; peaks of 3 and 4 GiB at batch 1 and 2
    # over 16x16 -> 1 GiB per image there, 4 GiB at 32x32, and 2 GiB of batch-independent step tensors: 7 GiB fixed.
    spec = plan.Spec("p", "top", 32, 16, "a top prior")
    row = plan.plan_row(spec, False, dict(params=2 ** 28, flops_per_image=2e12),
                        dict(side=16, peak_batch1=3 * gib, peak_batch2=4 * gib), usable=0.9, peak_tflops=494.7,
                        utilization=0.25)
    assert row["state_bytes"] == 5 * gib and row["step_fixed_bytes"] == 2 * gib
    assert row["activation_bytes_per_image"] == 4 * gib
    # (21.6 - 7) / 4 = 3.65; (36 - 7) / 4 = 7.25; (72 - 7) / 4 = 16.25.
    assert row["max_micro_batch"] == {"24": 3, "40": 7, "80": 16}
    # 1e5 x 2e12 / (494.7e12 x 0.25) = 1617.1 s = 0.4492 h.
    assert row["h100_hours_per_100k"] == pytest.approx(0.4492, abs=1e-4)
    table = plan.report(dict(rows=[row], linearity_check=None, assumptions=dict(
        usable=0.9, peak_tflops=494.7, utilization=0.25, threads=1, machine="m", command="c")))
    assert "| p | a top prior | no | 268.4M | 2,000 | 5.00 | 2.00 | 4,096 | 3 | 7 | 16 | 0.45 |" in table
