"""FLOPs of a training step as torch counts them, and the machine's practical FLOP/s peak: together they give the
fastest a step could run here (its FLOPs at the peak), the ceiling any speed-up target is checked against.

``step_flops``: ``torch.utils.flop_counter.FlopCounterMode`` over one call (a forward and backward): matmuls,
convolutions and attention; elementwise ops and optimiser updates are not counted. The CPU's fused attention kernel
is not in torch's FLOP registry, so it is counted with torch's own SDPA formulas, which count every score, masked or
not. ``matmul_peak``: median FLOP/s of repeated n x n ``torch.mm`` (2048 by default), the practical peak of dense
arithmetic at the current torch thread count."""
from __future__ import annotations

import statistics
import time


def step_flops(fn) -> int:
    """FLOPs of ``fn()`` (e.g. one forward and backward) as torch counts them."""
    import torch
    from torch.utils import flop_counter

    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    mapping = {  # shapes in, FLOPs out: the same formulas torch uses for its CUDA attention kernels
        cpu_flash: lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
        cpu_flash_backward: lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(
            g, q, k, v),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype=None, n: int = 2048, warmup: int = 2, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n matmul in ``dtype`` (float32 by default)."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)
