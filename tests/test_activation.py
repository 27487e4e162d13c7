"""The library's ELU (vqprior.models.activation.elu) equals F.elu in values and gradients, in float32, float64 and under
bf16 autocast; every place PixelSNAIL applies ELU uses it (training forward/backward, evaluation, the cached
sampler); the allocator settings apply once on glibc and step aside where they should."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vqprior.runtime.allocator as allocator
from conftest import tiny_model
from vqprior.models.activation import elu
from vqprior.sampling.sampler import sample


def _inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 32, 32, dtype=dtype) * 4  # above vqprior.models.activation.SMALL: the exp-based path
    edges = [0.0, -0.0, 1e-9, -1e-9, -30.0, 30.0, -79.9, -80.0, -87.5, -100.0, -1e30, float("-inf")]
    x.view(-1)[:len(edges)] = torch.tensor(edges, dtype=dtype)  # edges, saturation, exp's subnormal/zero range
    return x


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1.2e-7), (torch.float64, 1e-15)])
def test_elu_matches_torch_in_values_and_gradients(dtype, tol, monkeypatch):
    import vqprior.models.activation

    x = _inputs(dtype)
    assert x.numel() >= vqprior.models.activation.SMALL
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = elu(a), F.elu(b)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert ya.dtype == dtype
    assert (ya - yb).abs().max().item() <= tol
    assert (a.grad - b.grad).abs().max().item() <= 4 * tol * grad.abs().max().item()
    monkeypatch.setattr(vqprior.models.activation, "SMALL", 0)  # gradcheck's small input, on the exp-based path too
    assert torch.autograd.gradcheck(elu, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


def test_elu_never_asks_exp_for_a_subnormal_result():
    """Float32 exp below about -87.3 returns subnormals or 0, which the CPU kernel computed 40-100x slower (docs in
    vqprior.models.activation); the CPU ELU's exp must only see inputs whose result is a normal float32."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("exp", "exp_"):
                seen.append(args[0].min().item())
            return func(*args, **(kwargs or {}))

    x = _inputs(torch.float32).requires_grad_()
    with Spy():
        y = elu(x)
        y.sum().backward()
    assert seen and min(seen) >= -87.0
    assert (y - F.elu(x)).abs().max().item() <= 1.2e-7 and torch.isfinite(x.grad).all()


def test_elu_under_bf16_autocast_rounds_like_torch():
    x = _inputs(torch.float32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = elu(a), F.elu(b)
    assert ya.dtype == torch.bfloat16
    # Both are computed in float32 and rounded once: at most one bf16 rounding step apart, mostly identical.
    assert torch.allclose(ya.float(), yb.float(), rtol=2 ** -7, atol=1e-7)
    assert (ya == yb).float().mean().item() > 0.99
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.allclose(a.grad.float(), b.grad.float(), rtol=2 ** -7, atol=2 ** -7)


def test_pixelsnail_never_calls_torch_elu(monkeypatch):
    """Training forward/backward, evaluation and the cached sampler all go through vqprior.models.activation.elu (with
    its small-tensor threshold off, so that every call takes the exp-based path)."""
    import vqprior.models.activation

    monkeypatch.setattr(vqprior.models.activation, "SMALL", 0)
    model = tiny_model(dtype=torch.float32)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)

    def refuse(*args, **kwargs):
        raise AssertionError("F.elu called")

    monkeypatch.setattr(F, "elu", refuse)
    model.train()
    model.log_prob(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model.log_prob(x)
    sample(model, 2, method="cached", generator=torch.Generator().manual_seed(0))


def _fresh_process(code, **env):
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_settings_apply_once_on_glibc_and_yield_to_the_users():
    import platform

    code = ("from vqprior.runtime.allocator import retain_freed_memory as r; a = r(); b = r(); print(a, b)")
    expected = ["True", "True"] if platform.libc_ver()[0] == "glibc" else ["False", "False"]
    assert _fresh_process(code) == expected
    assert _fresh_process(code, MALLOC_TRIM_THRESHOLD_="1000000") == ["False", "False"]


def test_allocator_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {})
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_freed_memory() is False


def test_small_tensors_take_torchs_single_kernel(monkeypatch):
    """The cached sampler's one-position rows are dispatch-bound: below SMALL elements elu is F.elu itself."""
    import vqprior.models.activation

    calls = []
    real = F.elu
    monkeypatch.setattr(F, "elu", lambda x, *a, **k: calls.append(x.numel()) or real(x, *a, **k))
    small, large = torch.randn(16, 64), torch.randn(vqprior.models.activation.SMALL)
    assert torch.equal(elu(small), real(small))
    elu(large)
    assert calls == [16 * 64]


def test_elu_off_the_cpu_is_torchs_fused_kernel(monkeypatch):
    """On any other device (a GPU; the meta device stands in for it here) F.elu is one fused kernel: use it."""
    calls = []
    real = F.elu
    monkeypatch.setattr(F, "elu", lambda x, *a, **k: calls.append(x.device.type) or real(x, *a, **k))
    out = elu(torch.empty(2, 3, device="meta"))
    assert out.device.type == "meta" and calls == ["meta"]


def test_elu_compiles_without_graph_breaks():
    """One graph, forward and backward, with F.elu's values (while compiling elu is F.elu: see the test below)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    x = torch.randn(4, 5, requires_grad=True)
    out = torch.compile(lambda t: elu(t) * 2, backend=counter, fullgraph=True)(x)
    out.sum().backward()
    assert counter.frame_count == 1
    assert torch.allclose(out, F.elu(x) * 2, atol=1e-7)


def test_elu_under_compile_is_torchs_op(monkeypatch):
    """While torch.compile traces, elu is F.elu: inductor fuses it itself, and torch 2.13's dynamo broke the graph on
    _ELU's ``out=`` op inside a model (every gated block then ran eagerly), which this pins on any torch."""
    import vqprior.models.activation

    calls = []
    real = F.elu
    monkeypatch.setattr(F, "elu", lambda x, *a, **k: calls.append(x.numel()) or real(x, *a, **k))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(vqprior.models.activation.SMALL, requires_grad=True)
    assert elu(x).grad_fn.name() == "EluBackward0" and calls == [x.numel()]
