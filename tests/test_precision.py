"""Numeric precision: draws made under bf16 autocast follow the exact distribution of their parameters (the sampling
arithmetic runs in float32 whatever the autocast), and the precision policy (fp32 / tf32 / bf16) sets PyTorch's
TF32 switches explicitly, through the library and through the commands."""
import pytest
import torch

from vqprior.models.distributions import LOG_SCALE_MIN, sample_categorical, sample_logistic_mixture, unit_to_uint8
from vqprior.runtime.precision import PRECISIONS, apply_precision_policy, precision_policy

DRAWS = 200_000
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
EDGES = (2.0 * torch.arange(1, 256, dtype=torch.float64) - 1.0) / 255.0 - 1.0  # between adjacent levels


def level_probs(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """(...,) logistic means / log-scales -> (..., 256): the mass the sampler's rounding gives each level (the
    continuous logistic's CDF between bin edges, the edge bins open-ended)."""
    s = torch.exp(log_scale.clamp(min=LOG_SCALE_MIN)).unsqueeze(-1)
    cdf = torch.sigmoid((EDGES - mean.unsqueeze(-1)) / s)
    zeros, ones = torch.zeros_like(cdf[..., :1]), torch.ones_like(cdf[..., :1])
    return torch.diff(torch.cat([zeros, cdf, ones], -1), dim=-1)


def exact_rgb_marginals(params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """(3, 256) exact marginal of each channel of the coupled RGB mixture ``params`` (P,), in float64: per component
    R, then G given each R, then B given each (R, G) pair with non-negligible mass."""
    p = params.double()
    logits = p[:mixtures]
    rest = p[mixtures:].view(9, mixtures)
    means, log_s, coeffs = rest[:3], rest[3:6], torch.tanh(rest[6:9])
    out = torch.zeros(3, 256, dtype=torch.float64)
    for k, weight in enumerate(torch.softmax(logits, 0)):
        p_r = level_probs(means[0, k], log_s[0, k])  # (256,)
        p_g = level_probs(means[1, k] + coeffs[0, k] * LEVELS, log_s[1, k].expand(256))  # (r, g)
        joint = p_r[:, None] * p_g
        mean_b = means[2, k] + coeffs[1, k] * LEVELS[:, None] + coeffs[2, k] * LEVELS[None, :]
        keep = joint > 1e-14
        p_b = (joint[keep, None] * level_probs(mean_b[keep], log_s[2, k].expand(int(keep.sum())))).sum(0)
        out += weight * torch.stack([p_r, joint.sum(0), p_b])
    return out


def total_variation(draws: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(draws.long(), minlength=probs.numel()).double() / draws.numel()
    return 0.5 * float((empirical - probs).abs().sum())


def rgb_params(mixtures: int = 3) -> torch.Tensor:
    """One position's parameters with spread components, one near the top edge bin, and real channel coupling."""
    logits = torch.tensor([0.3, 1.0, -0.5])
    means = torch.tensor([[-0.6, 0.1, 0.85], [0.2, -0.3, 0.5], [0.0, 0.4, -0.9]])  # (channel, mixture)
    log_scales = torch.tensor([[-2.5, -1.8, -3.0], [-2.0, -2.6, -1.5], [-3.2, -2.2, -2.0]])
    coupling = torch.tensor([[0.5, -0.3, 0.8], [0.2, 0.6, -0.4], [-0.5, 0.3, 0.1]])  # before tanh
    return torch.cat([logits, means.flatten(), log_scales.flatten(), coupling.flatten()])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_logistic_mixture_draws_follow_the_exact_distribution(autocast):
    """bf16 parameters (what a bf16 forward pass hands the head) sampled under bf16 autocast: each channel's
    marginal is as close to the exact one as fp32 draws are (sampling noise ~0.013 at 200k draws; bf16 noise and
    inverse-CDF arithmetic gave 0.16-0.24)."""
    params = rgb_params().bfloat16()
    exact = exact_rgb_marginals(params, 3)
    assert torch.allclose(exact.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-9)
    batch = params.unsqueeze(0).expand(DRAWS, -1)
    generator = torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        values = sample_logistic_mixture(batch if autocast else batch.float(), 3, 3, generator)
    assert values.dtype == torch.float32
    draws = unit_to_uint8(values)
    for channel in range(3):
        assert total_variation(draws[:, channel], exact[channel]) < 0.02, channel


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_categorical_draws_follow_the_exact_distribution(autocast):
    """64 codes with spread bf16 logits, Gumbel-max under bf16 autocast: TV as in fp32 (~0.004; bf16 noise and
    sums gave 0.045)."""
    logits = (torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2.5).bfloat16()
    exact = torch.softmax(logits.double(), 0)
    batch = logits.unsqueeze(0).expand(DRAWS, -1)
    generator = torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        draws = sample_categorical(batch if autocast else batch.float(), generator)
    assert total_variation(draws, exact) < 0.012


def test_float64_sampling_stays_float64():
    params = rgb_params().double().unsqueeze(0).expand(4, -1)
    assert sample_logistic_mixture(params, 3, 3, torch.Generator().manual_seed(0)).dtype == torch.float64


# --- the precision policy ---------------------------------------------------------------------------------------

@pytest.fixture
def restore_tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("precision,expected", [("fp32", (False, False)), ("bf16", (False, False)),
                                                ("fp16", (False, False)), ("tf32", (True, True))])
def test_precision_policy_sets_both_tf32_switches(precision, expected, restore_tf32_flags):
    for start in (True, False):  # whatever the switches were before (PyTorch's cuDNN default is TF32 on)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = start
        apply_precision_policy(precision)
        assert tf32_flags() == expected


def test_unknown_precision_is_a_user_error():
    from vqprior.errors import UserError

    with pytest.raises(UserError, match="fp32, tf32, bf16 or fp16"):
        apply_precision_policy("fp8")
    assert PRECISIONS == ("fp32", "tf32", "bf16", "fp16")


def test_commands_apply_the_policy(tmp_path, restore_tf32_flags):
    """sample and evaluate leave the switches as their --precision says (a train command restores them)."""
    from cli_support import check_ok, run_cli, train_pixel_run

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    train_pixel_run(tmp_path / "run", steps=1, limit=16)  # a training run restores the switches it found
    assert tf32_flags() == (True, True)
    ckpt = tmp_path / "run" / "latest.pt"
    check_ok(run_cli("sample", ckpt, "--num", "1", "--precision", "tf32", "--out", tmp_path / "a.png",
                     "--device", "cpu"))
    assert tf32_flags() == (True, True)
    check_ok(run_cli("evaluate", ckpt, "--limit", "4", "--quiet", "--device", "cpu"))
    assert tf32_flags() == (False, False)
    check_ok(run_cli("evaluate", ckpt, "--limit", "4", "--quiet", "--device", "cpu", "--precision", "tf32"))
    assert tf32_flags() == (True, True)
    check_ok(run_cli("complete", ckpt, "--image", tmp_path / "a.png", "--keep-rows", "4", "--num", "1",
                     "--out", tmp_path / "c.png", "--device", "cpu"))
    assert tf32_flags() == (False, False)


def test_policies_in_turn_never_mix_torchs_two_tf32_apis(restore_tf32_flags):
    """A precision_policy block restored the switches through torch.set_float32_matmul_precision too; the next
    apply_precision_policy (legacy switches) then left torch 2.14 in a mixed state in which the following
    precision_policy raised RuntimeError: a run of commands in one process (bench/gpu_check.py) would crash."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with precision_policy("fp32"):
        pass
    apply_precision_policy("tf32")
    apply_precision_policy("fp32")
    with precision_policy("tf32"):
        assert tf32_flags() == (True, True)
    assert tf32_flags() == (False, False)
