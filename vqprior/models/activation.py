"""ELU, the only nonlinearity of PixelSNAIL's gated blocks, written so that no CPU pays for a slow ``expm1``.

Why not ``F.elu``: on some CPUs its forward kernel's ``expm1`` path costs many times ``torch.exp`` of the same
tensor, a large share of a training step. This version uses ``exp`` on the negative part only,
``elu(x) = max(x, exp(min(x, 0)) - 1)`` (exact because exp(t) - 1 >= t for every t, with equality only at 0; the
negative part is floored at ``LOW``, below), four passes in place on one fresh tensor: where ``expm1`` is fast it
costs what ``F.elu`` costs, and it avoids the slow case.

The backward is computed from the output, as PyTorch's own ``elu_backward(..., is_result=True)`` does
(d elu / dx = 1 for x > 0, elu(x) + 1 otherwise), so the input is not kept for the backward pass.

Where: on CPU tensors of at least ``SMALL`` elements. Below that (the cached sampler's one-position rows, a few
thousand elements) the cost is dispatch, not arithmetic: one ``F.elu`` call beats four ops and an autograd node. On a
GPU ``F.elu`` is one fused elementwise kernel and this form would be four, so ``elu`` calls
``F.elu`` for tensors on any other device, and under ``torch.compile`` (which generates its own fused kernel).

Values: equal to ``F.elu`` to float32 rounding of ``exp(x) - 1`` (absolute error below 1e-7; tests check values
and gradients against ``F.elu`` in float32, float64 and under bf16 autocast). Inputs that are not float32 or
float64 (bf16 / fp16 under autocast) are computed in float32 and rounded once, as ``F.elu`` does internally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL = 1 << 16  # elements; smaller tensors go to F.elu (see the module docstring)
# exp's floor: below about -87.3 float32 exp returns subnormals or 0, which some CPU kernels compute many times more
# slowly. A guard: trained models do not feed ELU such inputs, un-initialised wide ones can.
# exp(-80) - 1 rounds to -1 in float32 and float64, as exp(x) - 1 does for every x below it: no value changes.
LOW = -80.0


class _ELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(LOW, 0).exp_().sub_(1)
        torch.maximum(out, x, out=out)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, out)


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU with alpha 1 (see the module docstring); use it wherever PixelSNAIL applies ELU."""
    if x.numel() < SMALL or x.device.type != "cpu" or not x.dtype.is_floating_point:
        return F.elu(x)  # checked first and cheaply: the cached sampler calls this ~20 times per position
    if torch.compiler.is_compiling():  # inductor writes its own fused ELU; and torch 2.13's dynamo broke the graph
        return F.elu(x)                # on _ELU's out= op, leaving the compiled model's blocks to run eagerly
    if x.dtype in (torch.float16, torch.bfloat16):
        return _ELU.apply(x.float()).to(x.dtype)
    return _ELU.apply(x)
