"""The training memory savings keep the objective: dropout keeps a 1-byte mask and gives the values and gradients of
a float mask, the gated blocks' one-op gate gives a * sigmoid(b), the nested checkpointing of the attention step
(channels-last and plain layouts) gives the plain path's loss and gradients, and the allocator's memory-first mode
gives freed activation-sized blocks back to the system (and is the one training with checkpointing uses)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vqprior.config import model_config_from_preset
from vqprior.models.layers import Dropout, GatedResBlock, drop_mask, gate
from vqprior.models.pixelsnail import PixelSNAIL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_dropout_saves_a_byte_mask_and_equals_a_float_mask(dtype, layout):
    x = torch.randn(2, 16, 8, 8, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = Dropout(0.3).train()(x)
    g = torch.randn_like(out)
    grad, = torch.autograd.grad(out, x, g)
    # The reference: the same draw as a float mask of 0 and 1/(1-p), multiplied in x's dtype.
    torch.manual_seed(3)
    keep = ~drop_mask(x.shape, 0.3)  # drawn in x's memory order: the elements are independent either way
    mask = keep.view(-1).as_strided(x.shape, x.stride()).float().div_(0.7).to(dtype)
    expected = x * mask
    expected_grad, = torch.autograd.grad(expected, x, g)
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    assert out.is_contiguous(memory_format=layout)
    big = [t for t in saved if t.numel() > 1]
    assert [t.dtype for t in big] == [torch.bool] and big[0].shape == x.shape


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gate_equals_a_times_sigmoid_b(layout):
    """Both forms of the gate (F.glu for NCHW maps, _Gate for channels-last ones) give a * sigmoid(b) and its
    gradient, keep the layout, and keep only h for the backward pass."""
    torch.manual_seed(0)
    block = GatedResBlock(8, "nin", cond_channels=3).double().to(memory_format=layout)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    cond = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=layout)
    out = block(x, cond=cond)
    assert out.is_contiguous(memory_format=layout)
    h = torch.randn(2, 16, 5, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gate(h)
    assert len(saved) == 1 and saved[0].shape == h.shape

    def reference(x):
        h = block.conv2(F.elu(block.conv1(F.elu(x)))) + block.cond(cond)
        a, b = h.chunk(2, 1)
        return x + a * torch.sigmoid(b)

    torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(reference(x), x, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_gate_under_compile_is_torchs_glu(monkeypatch):
    """While torch.compile traces, a channels-last gate is F.glu, not _Gate: inductor fuses it and picks what to keep,
    and torch 2.13's dynamo broke the graph on _Gate's out= into a channels-last view, so every gated block of a wide
    (channels-last) model ran eagerly under --compile; this pins the routing on any torch."""
    h = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert type(gate(h).grad_fn).__name__ != "GluBackward0"  # eager: the layout-preserving _Gate
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert type(gate(h).grad_fn).__name__ == "GluBackward0"


@pytest.mark.parametrize("filters", [16, 128])  # 128 and up: the channels-last layout of wide models
def test_checkpointed_bottom_prior_gives_the_plain_loss_and_gradients(filters):
    """A bottom prior (top-code condition, attention with dropout) in float32 at small sizes: the checkpointed step,
    with the attention step's parts checkpointed inside it, equals the plain one."""
    config = model_config_from_preset("tiny", head="codes", num_codes=6, height=6, width=6, cond_num_codes=5,
                                      cond_height=3, cond_width=3, filters=filters, dropout=0.3, attn_heads=2)
    g = torch.Generator().manual_seed(1)
    codes, top = torch.randint(0, 6, (2, 6, 6), generator=g), torch.randint(0, 5, (2, 3, 3), generator=g)

    def step(recompute):
        torch.manual_seed(0)
        model = PixelSNAIL(config).train()
        model.checkpoint_activations = recompute
        torch.manual_seed(5)  # the same dropout masks in both runs (checkpointing replays the RNG state)
        loss = -model.log_prob(codes, condition=top).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (plain_loss, plain), (loss, recomputed) = step(False), step(True)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert all(grad is not None for grad in plain.values())
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], msg=name)


def _rss_after(code):
    """Resident MB that a fresh process reports after running ``code`` (MALLOC_* variables removed)."""
    script = ("import torch, vqprior.runtime.allocator as a\n" + code + "\n"
              "print(int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_memory_first_allocator_gives_freed_activations_back():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # 100 maps of 4 MB, then all but the last freed: kept in the heap by retain_freed_memory, given back by
    # return_freed_memory (the last one pins the heap's top, as a live tensor does in a training step).
    churn = "x = [torch.ones(1 << 20) for _ in range(100)]\ndel x[:-1]"
    kept = _rss_after("assert a.retain_freed_memory()\n" + churn)
    returned = _rss_after("a.retain_freed_memory(); assert a.return_freed_memory()\n" + churn)
    assert kept - returned > 300


def test_train_commands_pick_the_allocator_and_the_library_leaves_it_alone(monkeypatch, tmp_path):
    """The train commands set the host allocator (memory first with --checkpoint-activations); ``train()`` itself,
    a library call, changes no process-wide malloc setting."""
    import vqprior.runtime.allocator as allocator
    from cli_support import check_ok, train_pixel_run
    from conftest import train_tiny

    calls = []
    monkeypatch.setattr(allocator, "_apply", lambda mode, settings: calls.append(mode) or True)
    check_ok(train_pixel_run(tmp_path / "plain", steps=1))
    check_ok(train_pixel_run(tmp_path / "ckpt", "--checkpoint-activations", steps=1))
    assert calls == ["retain", "return"]
    train_tiny(tmp_path / "library", 1, checkpoint_activations=True)
    assert calls == ["retain", "return"]