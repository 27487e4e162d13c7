"""The training speed paths keep the objective: the bit-drawn dropout has the rate and independence of dropout,
1x1 convolutions as batched matmuls equal F.conv2d,
activation checkpointing gives the same gradients, a non-finite gradient (finite loss) is still skipped by the
fused norm check, --compile keeps plain checkpoint keys and resumes, a missing compiler is a one-line error, and
the Makefile's exported environment trains ``small`` in bf16."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cli_support import TINY_TRAIN, run_cli
from conftest import REPO, NaNTask, tiny_model, tiny_pixel_task, train_tiny
from vqprior.checkpoint import read_checkpoint
from vqprior.errors import UserError
from vqprior.models.layers import Dropout, WNConv2d, drop_mask
from vqprior.runtime.compiler import check_compiler


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_its_rate_scale_and_independence(p, dtype):
    torch.manual_seed(0)
    n = 400_000
    out = Dropout(p).train()(torch.ones(n, dtype=dtype))
    dropped = (out == 0).double()
    rate = dropped.mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard errors of the nominal rate
    kept = out[out != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # Independence: neighbouring mask elements are uncorrelated, and two calls draw different masks.
    a, b = dropped[:-1] - rate, dropped[1:] - rate
    assert abs((a * b).mean().item() / (rate * (1 - rate))) < 5 / n ** 0.5
    assert not torch.equal(Dropout(p).train()(torch.ones(n)) == 0, Dropout(p).train()(torch.ones(n)) == 0)
    x = torch.randn(100)
    assert torch.equal(Dropout(p).eval()(x), x)


@pytest.mark.parametrize("shape", [(7, 5, 3), (4, 64, 8, 8)])
def test_drop_mask_draws_32_bits_per_element(shape):
    """The CPU mask compares each int32 half of a random int64 with round(p * 2^32) - 2^31: the same seed gives that
    mask (odd element counts too), and p at the ends of the range keeps or drops everything."""
    torch.manual_seed(4)
    mask = drop_mask(shape, 0.3)
    n = math.prod(shape)
    torch.manual_seed(4)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int32)[:n]
    assert mask.dtype == torch.bool and mask.shape == shape
    assert torch.equal(mask.flatten(), bits < round(0.3 * 2 ** 32) - 2 ** 31)
    assert not drop_mask(shape, 1e-12).any() and drop_mask(shape, 1 - 1e-12).all()


@pytest.mark.parametrize("p", [0.3, 1 - 1e-12])  # the int32 path, and the torch.rand path p rounds to 1 on
def test_kept_mask_is_the_complement_of_the_same_draw(p):
    """``kept=True`` (what Dropout asks for) is exactly the complement of the drop mask the same seed gives."""
    torch.manual_seed(5)
    dropped = drop_mask((3, 17, 5), p)
    torch.manual_seed(5)
    kept = drop_mask((3, 17, 5), p, kept=True)
    assert kept.dtype == torch.bool and torch.equal(kept, ~dropped)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pointwise_convolution_equals_conv2d(bias, layout):
    """A 1x1 WNConv2d on the CPU (a batched matmul for NCHW maps, F.conv2d for channels-last ones) gives F.conv2d's
    values and gradients, keeps the input's layout, and autocasts to bf16 as F.conv2d does."""
    torch.manual_seed(0)
    conv = WNConv2d(7, 12, 1, bias=bias).double()
    x = torch.randn(3, 7, 5, 6, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    out = conv(x)
    ref = F.conv2d(x, conv.weight(), conv.bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=layout)
    g = torch.randn_like(out)
    params = [x, *conv.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.float()(x.detach().float()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["pixels", "bottom prior with classes"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    def grads(recompute):
        g = torch.Generator().manual_seed(1)
        if kind == "pixels":
            model = tiny_model(dropout=0.3, height=6, width=6).train()
            x, inputs = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8, generator=g), {}
        else:  # the class bias and the top-code condition also enter every recomputed block
            model = tiny_model(dropout=0.3, height=6, width=6, head="codes", num_codes=5, num_classes=3,
                               cond_num_codes=4, cond_height=3, cond_width=3).train()
            x = torch.randint(0, 5, (3, 6, 6), generator=g)
            inputs = dict(label=torch.tensor([0, 2, 1]), condition=torch.randint(0, 4, (3, 3, 3), generator=g))
        model.checkpoint_activations = recompute
        torch.manual_seed(5)  # the same dropout masks in both runs (checkpointing replays the RNG state)
        model.log_prob(x, **inputs).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("heads,key,value", [(1, 16, 32), (8, 32, 32), (2, 8, 16)])
def test_attention_runs_on_the_fused_kernel(heads, key, value):
    """Forward and backward run with SDPA restricted to the fused flash kernel (memory linear in positions), for
    one head and for several heads whose query and value sizes are equal (no padding: the head view must still be
    made contiguous, else SDPA falls back to the math kernel's L x L scores), with the same result as the math
    kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vqprior.models.attention import CausalSelfAttention, background

    torch.manual_seed(0)
    attn = CausalSelfAttention(4, 16, key, value, heads=heads)
    raw, h, bg = torch.randn(2, 4, 6, 5), torch.randn(2, 16, 6, 5, requires_grad=True), background(6, 5)
    results = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            out = attn(raw, h, bg)
            grad, = torch.autograd.grad(out.square().sum(), h)
        results.append((out, grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path):
    class BadGradient(NaNTask):
        def loss(self, model, batch):
            self.calls += 1
            loss, metrics = self.task.loss(model, batch)
            if self.calls == 2:  # forward value stays finite; d sqrt(u)/du at u=0 is inf, times 0 is NaN
                w = next(model.parameters())
                loss = loss + 0.0 * torch.sqrt(w - w.detach()).sum()
            return loss, metrics

    for clip in (0.0, 1.0):  # the guard reads the same fused norm with and without clipping
        result = train_tiny(tmp_path / f"run{clip}", 4, task=BadGradient(tiny_pixel_task(), 0), grad_clip=clip)
        assert result["status"] == "finished" and result["skipped_steps"] == 1
        weights = read_checkpoint(tmp_path / f"run{clip}" / "latest.pt")["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_train_seconds_accumulate_across_resume(tmp_path):
    train_tiny(tmp_path / "run", 3)
    first = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert first["train_seconds"] > 0
    train_tiny(tmp_path / "run", 5, checkpoint=first)
    assert read_checkpoint(tmp_path / "run" / "latest.pt")["train_seconds"] > first["train_seconds"]


def test_missing_compiler_is_a_one_line_error(tmp_path):
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # restored on exit for the other tests
        with pytest.raises(UserError, match="C\\+\\+ compiler"):
            check_compiler(torch.device("cpu"))
        result = run_cli("train-pixels", *TINY_TRAIN, "--image-size", "8", "--steps", "2", "--compile",
                         "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: --compile needs a C++ compiler")
    assert not (tmp_path / "run").exists()


def test_checkpoint_activations_is_refused_for_the_vqvae(tmp_path):
    result = run_cli("train-vqvae", "--preset", "tiny", "--image-size", "8", "--steps", "1", "--batch-size", "4",
                     "--quiet", "--device", "cpu", "--checkpoint-activations", "--out", tmp_path / "vq")
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: --checkpoint-activations applies to PixelSNAIL")


def compiled_training_keeps_plain_keys_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = [*TINY_TRAIN, "--image-size", "8", "--compile", "--checkpoint-every", "1", "--out", out]
    first = run_cli("train-pixels", *common, "--steps", "2")
    assert first.exit_code == 0, first.output
    ckpt = read_checkpoint(out / "latest.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["train"]["compile"] is True
    assert not [k for k in [*ckpt["model"], *ckpt["ema"]] if "_orig_mod" in k or k.startswith("module.")]
    resumed = run_cli("train-pixels", *common, "--steps", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(out / "latest.pt")["step"] == 3


def test_compiled_training_keeps_plain_keys_and_resumes(tmp_path, monkeypatch):
    """--compile's wrapping (``torch.compile`` returns a module whose own keys start ``_orig_mod.``) with torch's
    eager backend standing in for inductor, which takes minutes to build its kernels on a CPU."""
    real, compiled = torch.compile, []

    def eager(module, **kwargs):
        compiled.append(module)
        return real(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager)
    compiled_training_keeps_plain_keys_and_resumes(tmp_path)
    assert len(compiled) == 2  # the first run and the resumed one


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/c++") and not os.environ.get("CXX"), reason="no C++ compiler")
def test_compiled_training_with_inductor_keeps_plain_keys_and_resumes(tmp_path):
    """The same with inductor building real kernels (``make test-slow``)."""
    compiled_training_keeps_plain_keys_and_resumes(tmp_path)


def _makefile_environment() -> dict[str, str]:
    """The variables the Makefile exports to every recipe (``export NAME ?= value`` / ``export NAME = value``)."""
    env = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"\s*export\s+(\w+)\s*[?:]?=\s*(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip()
    return env


def test_small_trains_in_bf16_under_the_makefile_environment(tmp_path):
    env = {**os.environ, **_makefile_environment(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vqprior.commands.cli", "train-pixels", "--dataset", "sample", "--preset", "small",
         "--precision", "bf16", "--steps", "2", "--batch-size", "2", "--eval-limit", "4", "--num-samples", "1",
         "--quiet", "--device", "cpu", "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run" / "latest.pt")["step"] == 2


def test_time_limit_ends_the_run_on_step_time_and_resume_keeps_it(tmp_path):
    import json

    out = tmp_path / "run"
    result = train_tiny(out, 100_000, time_limit=0.002)  # 0.12 s of step time: a few dozen tiny steps, not 100,000
    ckpt = read_checkpoint(out / "latest.pt")
    assert result["status"] == "finished" and 0 < result["step"] < 100_000
    assert ckpt["step"] == result["step"] and ckpt["train_seconds"] >= 0.12
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"][-1] == result["step"]  # the final evaluation ran
    # Resumed with the same limit: already reached, so no further step; a larger limit trains on.
    again = train_tiny(out, 100_000, checkpoint=ckpt, time_limit=0.002)
    assert again["step"] == result["step"]
    longer = ckpt["train_seconds"] / 60 + 0.002  # beyond what was spent, however long the last step took
    more = train_tiny(out, 100_000, checkpoint=read_checkpoint(out / "latest.pt"), time_limit=longer)
    assert more["step"] > result["step"]
    assert read_checkpoint(out / "latest.pt")["train_seconds"] >= longer * 60


def test_time_limit_option_is_validated_and_recorded(tmp_path):
    bad = run_cli("train-pixels", *TINY_TRAIN, "--image-size", "8", "--time-limit", "-1", "--out", tmp_path / "bad")
    assert bad.exit_code != 0 and "--time-limit" in bad.output
    ok = run_cli("train-pixels", *TINY_TRAIN, "--image-size", "8", "--steps", "100000", "--time-limit", "0.002",
                 "--out", tmp_path / "run")
    assert ok.exit_code == 0, ok.output
    ckpt = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert ckpt["config"]["train"]["time_limit"] == 0.002 and ckpt["step"] < 100_000


def test_a_resumed_first_step_on_a_logging_step_reports_its_rate(tmp_path):
    import json

    out = tmp_path / "run"
    train_tiny(out, 9)
    train_tiny(out, 12, checkpoint=read_checkpoint(out / "latest.pt"))  # the resumed process's first step is step 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step10 = [r for r in records if r["split"] == "train" and r["step"] == 10]
    assert len(step10) == 1 and step10[0]["items_per_s"] > 0
