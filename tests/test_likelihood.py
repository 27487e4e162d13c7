"""Likelihoods are normalised and match a plain float64 reference: the logistic mixture over all 256 values per
channel (edge bins included), the categorical prior over every possible code map, bits/dim arithmetic."""
import itertools
import math

import pytest
import torch

from conftest import tiny_model
from vqprior.evaluation.likelihood import ClassMarginal, evaluate_nll
from vqprior.models.distributions import logistic_mixture_log_prob, split_logistic_params

VALUES = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0


def _random_params(channels, mixtures, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    per = 1 + 2 * channels + (3 if channels == 3 else 0)
    p = torch.randn(n, mixtures * per, generator=g, dtype=torch.float64)
    # moderate scales: log-scales in [-4, 0]; means across [-1.2, 1.2] so both edge bins carry mass
    p = p.view(n, -1)
    p[:, mixtures:mixtures + channels * mixtures] = torch.rand(n, channels * mixtures, generator=g,
                                                              dtype=torch.float64) * 2.4 - 1.2
    p[:, mixtures + channels * mixtures:mixtures + 2 * channels * mixtures] = -4 * torch.rand(
        n, channels * mixtures, generator=g, dtype=torch.float64)
    return p


def _reference_channel_probs(mean: float, log_scale: float) -> torch.Tensor:
    """Plain float64 discretized logistic: probabilities of all 256 values (edge bins absorb the tails)."""
    edges = torch.arange(1, 256, dtype=torch.float64) / 127.5 - 1.0 - 1.0 / 255  # the 255 inner bin edges
    cdf = torch.sigmoid((edges - mean) / math.exp(log_scale))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)])
    return cdf[1:] - cdf[:-1]


def _reference_probs(params, channels, mixtures, fixed):
    """Reference probabilities of one pixel: with ``fixed`` = values of the first len(fixed) channels, returns the
    (256,) probabilities of the next channel jointly with the fixed ones, p(fixed..., v) for every v."""
    logits, means, log_scales, coeffs = split_logistic_params(params.view(1, -1, 1, 1), channels, mixtures)
    pis = torch.softmax(logits.flatten(), 0)
    x = [v / 127.5 - 1.0 for v in fixed]
    out = torch.zeros(256, dtype=torch.float64)
    for k in range(mixtures):
        prob = float(pis[k])
        shifted = []
        for ch in range(len(fixed) + 1):
            m = float(means[0, ch, k])
            if channels == 3 and ch == 1:
                m += float(coeffs[0, 0, k]) * x[0]
            if channels == 3 and ch == 2:
                m += float(coeffs[0, 1, k]) * x[0] + float(coeffs[0, 2, k]) * x[1]
            shifted.append(_reference_channel_probs(m, float(log_scales[0, ch, k])))
        for ch, v in enumerate(fixed):
            prob *= float(shifted[ch][v])
        out += prob * shifted[len(fixed)]
    return out


def _library_probs(params, mixtures, fixed):
    """Library probabilities p(fixed..., v, then summed over the remaining channels) for all v (RGB)."""
    n_rest = 2 - len(fixed)
    grids = torch.meshgrid(*([torch.arange(256)] * (1 + n_rest)), indexing="ij")
    cols = [torch.full_like(grids[0], f) for f in fixed] + list(grids)
    x = (torch.stack(cols, -1).reshape(-1, 3).double() / 127.5 - 1.0).view(-1, 3, 1, 1)
    p = params.view(1, -1, 1, 1).expand(x.shape[0], -1, -1, -1)
    probs = logistic_mixture_log_prob(x, p, mixtures).exp().view(256, -1)
    return probs.sum(1)


def test_logistic_mixture_sums_to_one_over_each_channel_given_earlier_ones():
    mixtures = 3
    params = _random_params(3, mixtures, 3)
    for i in range(params.shape[0]):
        # B given (R, G): sum_b p(r, g, b) equals the reference p(r, g) for edge and inner values
        for r, g in [(0, 0), (255, 255), (77, 128)]:
            ours = _library_probs(params[i], mixtures, (r, g))
            assert torch.allclose(ours, _reference_probs(params[i], 3, mixtures, (r, g)), rtol=1e-6, atol=1e-12)
            ref_rg = _reference_probs(params[i], 3, mixtures, (r,))[g]
            assert float(ours.sum()) == pytest.approx(float(ref_rg), rel=1e-6, abs=1e-12)
    # G and B given R: sum over (g, b) of the library's p(r, g, b) equals the reference marginal p(r) ...
    ref_r = _reference_probs(params[0], 3, mixtures, ())
    for r in (0, 130, 255):
        assert float(_library_probs(params[0], mixtures, (r,)).sum()) == pytest.approx(float(ref_r[r]), abs=1e-7)
    # ... and that marginal over R sums to 1, so every channel is normalised given the earlier ones.
    assert float(ref_r.sum()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_logistic_mixture_matches_float64_reference_including_edge_bins(channels):
    mixtures = 2
    params = _random_params(channels, mixtures, 6, seed=1)
    g = torch.Generator().manual_seed(2)
    for i in range(params.shape[0]):
        for rgb in [(0,) * channels, (255,) * channels, (0, 255, 128)[:channels],
                    tuple(torch.randint(0, 256, (channels,), generator=g).tolist())]:
            x = torch.tensor([v / 127.5 - 1.0 for v in rgb], dtype=torch.float64).view(1, channels, 1, 1)
            ours = float(logistic_mixture_log_prob(x, params[i].view(1, -1, 1, 1), mixtures).exp())
            ref = float(_reference_probs(params[i], channels, mixtures, rgb[:-1])[rgb[-1]])
            assert ours == pytest.approx(ref, rel=1e-6, abs=1e-10)


def test_grayscale_mixture_sums_to_one():
    params = _random_params(1, 4, 5, seed=3)
    x = VALUES.view(256, 1, 1, 1)
    for i in range(5):
        total = logistic_mixture_log_prob(x, params[i].view(1, -1, 1, 1).expand(256, -1, -1, -1), 4).exp().sum()
        # not exact: bins with mass < 1e-5 use the density at the bin centre (PixelCNN++), worth ~1e-8 here
        assert float(total) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("conditioned", [False, True])
def test_categorical_prior_sums_to_one_over_every_code_map(conditioned):
    extra = dict(num_classes=2, cond_num_codes=2, cond_height=2, cond_width=2) if conditioned else {}
    model = tiny_model(head="codes", num_codes=3, height=2, width=3, **extra)
    maps = torch.tensor(list(itertools.product(range(3), repeat=6))).view(-1, 2, 3)  # all 3^6 code maps
    kwargs = {}
    if conditioned:
        kwargs = dict(label=torch.ones(len(maps), dtype=torch.long),
                      condition=torch.tensor([[0, 1], [1, 1]]).expand(len(maps), 2, 2))
    with torch.no_grad():
        log_p = model.log_prob(maps, **kwargs).sum((1, 2))
    assert float(torch.logsumexp(log_p, 0).exp()) == pytest.approx(1.0, abs=1e-10)


def test_class_marginal_is_a_normalised_density_over_every_code_map():
    model = tiny_model(head="codes", num_codes=3, height=2, width=3, num_classes=3)
    maps = torch.tensor(list(itertools.product(range(3), repeat=6))).view(-1, 2, 3)
    log_p = ClassMarginal(model).log_prob(maps, label=torch.zeros(len(maps), dtype=torch.long))  # labels ignored
    assert log_p.shape == (len(maps),)
    assert float(torch.logsumexp(log_p, 0).exp()) == pytest.approx(1.0, abs=1e-10)


def test_class_marginal_matches_float64_mean_of_the_class_likelihoods():
    model = tiny_model(channels=3, height=4, width=4, num_classes=4)
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    marginal = ClassMarginal(model).log_prob(x)
    for i in range(len(x)):
        with torch.no_grad():
            per_class = [math.exp(float(model.log_prob(x[i:i + 1], label=torch.tensor([y])).sum())) for y in range(4)]
        assert float(marginal[i]) == pytest.approx(math.log(sum(per_class) / 4), abs=1e-9)
        # the sum's single terms bound it: max_y log p(x|y) - log 4 <= log p(x) <= max_y log p(x|y)
        best = math.log(max(per_class))
        assert best - math.log(4) - 1e-9 <= float(marginal[i]) <= best + 1e-9


def test_class_marginal_refuses_an_unconditional_model():
    with pytest.raises(ValueError, match="not class-conditional"):
        ClassMarginal(tiny_model())


class UniformModel:
    def log_prob(self, x, condition=None, label=None):
        return torch.full((x.shape[0], x.shape[2], x.shape[3]), -x.shape[1] * math.log(256.0), dtype=torch.float64)


def test_uniform_model_scores_exactly_eight_bits_per_dim():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    loader = [{"image": images[:6], "label": torch.zeros(6)}, {"image": images[6:], "label": torch.zeros(4)}]
    result = evaluate_nll(UniformModel(), loader)
    assert result["bits_per_value"] == pytest.approx(8.0, abs=1e-12)
    assert result["values"] == 10 * 3 * 4 * 4
