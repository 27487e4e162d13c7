"""Classifier-free guidance (vqprior.sampling.guidance, docs/guidance.md): guided draws follow the guided distribution
(a tiny prior enumerated over every code map; a pixel position's guided sub-pixel tables), W = 0 is the unguided sampler
bit for bit, the cached and naive samplers agree, and models without a null class refuse guidance."""
import itertools
import math

import numpy as np
import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.config import model_config_from_preset
from vqprior.errors import UserError
from vqprior.models.conditionals import PixelConditionals
from vqprior.models.distributions import filter_logits
from vqprior.models.pixelsnail import PixelSNAIL
from vqprior.sampling.guidance import Guidance, guided_log_probs
from vqprior.sampling.sampler import complete, sample


def chi_square_z(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson's statistic of counts against expected counts (cells under ``min_expected`` pooled into one), as a
    standard normal deviate by the Wilson-Hilferty transform: about N(0, 1) when the draws follow ``expected``."""
    keep = expected >= min_expected
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat, k = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    return ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


def with_class_embeddings(model, std: float = 1.0, seed: int = 0):
    """Random class (and null) embeddings, so that p(x | y) and p(x) differ and guidance has something to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "class_embedding", None) is not None:
                m.class_embedding.weight.copy_(torch.randn(m.class_embedding.weight.shape, generator=g) * std)
    return model.eval()


def tiny_prior(h=2, w=2, codes=3, cond=0, dtype=torch.float64, null_class=True):
    torch.manual_seed(0)
    extra = dict(cond_num_codes=2, cond_height=1, cond_width=1) if cond else {}
    config = model_config_from_preset("tiny", head="codes", num_codes=codes, height=h, width=w, num_classes=3,
                                      null_class=null_class, **extra)
    return with_class_embeddings(PixelSNAIL(config).to(dtype), std=2.0)


def tiny_pixels(channels=3, size=3, null_class=True, attention=True):
    torch.manual_seed(0)
    config = model_config_from_preset("tiny", head="pixels", channels=channels, height=size, width=size,
                                      num_classes=3, null_class=null_class, attention=attention)
    return with_class_embeddings(PixelSNAIL(config))


# --- the guided distribution of a tiny prior, enumerated ----------------------------------------------------------

def guided_map_probs(model, label: int, scale: float, condition=None, temperature=1.0, top_k=0, start=0,
                     prefix=None):
    """Probability of every code map (rows of ``maps``) under the guided sampler: the product over positions >=
    start of each normalised, filtered guided conditional, computed with full forward passes (no sampler code)."""
    c = model.config
    maps = torch.tensor(list(itertools.product(range(c.num_codes), repeat=c.height * c.width)))
    if prefix is not None:
        maps = maps[(maps[:, :start] == prefix.flatten()[:start]).all(1)]
    x = maps.view(-1, c.height, c.width)
    n = len(x)
    cond = None if condition is None else condition.expand(n, -1, -1)
    with torch.no_grad():
        lc = torch.log_softmax(model(x, label=torch.full((n,), label), condition=cond), 1)
        lu = torch.log_softmax(model(x, label=torch.full((n,), c.num_classes), condition=cond), 1)
    log_p = torch.zeros(n, dtype=torch.float64)
    for p in range(start, c.height * c.width):
        r, col = divmod(p, c.width)
        logits = guided_log_probs(lc[:, :, r, col], lu[:, :, r, col], scale)
        logits = torch.log_softmax(filter_logits(logits, temperature, top_k), 1)
        log_p += logits.gather(1, maps[:, p:p + 1]).squeeze(1).double()
    return maps, log_p.exp()


def counts_of(draws: torch.Tensor, maps: torch.Tensor, codes: int) -> np.ndarray:
    index = lambda m: (m * codes ** torch.arange(m.shape[1] - 1, -1, -1)).sum(1)  # noqa: E731
    where = {int(k): i for i, k in enumerate(index(maps))}
    observed = np.zeros(len(maps))
    for k, n in zip(*np.unique(index(draws.flatten(1)).numpy(), return_counts=True)):
        observed[where[int(k)]] = n  # a draw outside ``maps`` (outside the prefix) raises KeyError
    return observed


@pytest.mark.parametrize("case", [
    dict(scale=1.5),
    dict(scale=3.0, temperature=0.8, top_k=2),
    dict(scale=1.0, start=2),  # completion: the first row given
    dict(scale=2.0, cond=True),  # a bottom prior: the top-code condition goes to both streams
], ids=["plain", "temperature-top-k", "completion", "condition"])
def test_guided_code_draws_follow_the_enumerated_guided_distribution(case):
    model = tiny_prior(cond=case.get("cond", False))
    condition = torch.tensor([[[1]]]) if case.get("cond") else None
    start, n, label = case.get("start", 0), 20000, 1
    prefix = torch.tensor([[2, 0], [0, 0]]) if start else None
    controls = dict(temperature=case.get("temperature", 1.0), top_k=case.get("top_k", 0))
    maps, probs = guided_map_probs(model, label, case["scale"], condition, start=start, prefix=prefix, **controls)
    assert abs(float(probs.sum()) - 1) < 1e-9
    kwargs = dict(label=label, guidance=case["scale"], **controls,
                  condition=None if condition is None else condition.expand(n, -1, -1))
    g = torch.Generator().manual_seed(0)
    if start:
        draws = complete(model, prefix, keep_rows=1, num=n, generator=g, **kwargs)
    else:
        draws = sample(model, n, generator=g, **kwargs)
    observed = counts_of(draws, maps, model.config.num_codes)
    assert chi_square_z(observed, probs.numpy() * n) < 4.5
    # The test can fail: the same draws are far from the unguided distribution.
    _, unguided = guided_map_probs(model, label, 0.0, condition, start=start, prefix=prefix, **controls)
    assert chi_square_z(observed, unguided.numpy() * n) > 10


def test_guided_samplers_cached_and_naive_agree():
    for model, kw in ((tiny_prior(3, 3, 5, dtype=torch.float32), dict(top_p=0.9)), (tiny_pixels(), {})):
        label = torch.tensor([0, 1, 2, 1])
        a = sample(model, 4, label=label, guidance=2.0, generator=torch.Generator().manual_seed(3), **kw)
        b = sample(model, 4, label=label, guidance=2.0, generator=torch.Generator().manual_seed(3), method="naive",
                   **kw)
        assert torch.equal(a, b)


# --- the pixel head: per-sub-pixel guided tables ------------------------------------------------------------------

def position_params(config, seed: int) -> torch.Tensor:
    """Head parameters of one position: mixture logits, means in [-0.6, 0.6], log-scales near -2.5, coupling."""
    g = torch.Generator().manual_seed(seed)
    M, C = config.mixtures, config.channels
    logits = torch.randn(M, generator=g)
    means = torch.rand(C * M, generator=g) * 1.2 - 0.6
    log_scales = torch.randn(C * M, generator=g) * 0.3 - 2.5
    coupling = torch.randn(3 * M, generator=g)
    return torch.cat([logits, means, log_scales, coupling])


def guided_tables(cond, uncond, scale, channels, mixtures, values, temperature=1.0):
    """For rows of drawn (N, C) values: each channel's guided (N, 256) table given the row's earlier channels."""
    streams = [PixelConditionals(p, channels, mixtures, temperature) for p in (cond, uncond)]
    tables = []
    for ch in range(channels):
        tables.append(guided_log_probs(streams[0].log_pmf(ch), streams[1].log_pmf(ch), scale).exp())
        for s in streams:
            s.observe(ch, values[:, ch])
    return tables


@pytest.mark.parametrize("scale,temperature", [(2.0, 1.0), (1.0, 0.8)])
def test_guided_pixel_draws_follow_the_per_subpixel_guided_tables(scale, temperature):
    model = tiny_pixels()
    c, n = model.config, 6000
    cond, uncond = (position_params(c, s).expand(n, -1) for s in (1, 2))
    draw = Guidance(model, dict(generator=torch.Generator().manual_seed(0), temperature=temperature), scale)
    values = draw(torch.cat([cond, uncond]))
    assert values.shape == (n, 3) and values.dtype == torch.uint8
    tables = guided_tables(cond, uncond, scale, c.channels, c.mixtures, values, temperature)
    plain = guided_tables(cond[:1], uncond[:1], 0.0, c.channels, c.mixtures, values[:1], temperature)  # R: one row
    for ch in range(3):
        # R: every row has the same table; G and B: the expected counts given each row's earlier channels.
        observed = np.bincount(values[:, ch].numpy(), minlength=256).astype(float)
        assert chi_square_z(observed, tables[ch].sum(0).numpy()) < 4.5, ch
    assert chi_square_z(np.bincount(values[:, 0].numpy(), minlength=256).astype(float), plain[0][0].numpy() * n) > 10


def test_the_guided_pixel_table_at_w0_is_the_conditional_one():
    model = tiny_pixels()
    c = model.config
    cond, uncond = position_params(c, 1).expand(4, -1), position_params(c, 2).expand(4, -1)
    values = torch.tensor([[10, 128, 250]] * 4, dtype=torch.uint8)
    for temperature in (1.0, 0.7):
        guided = guided_tables(cond, uncond, 0.0, 3, c.mixtures, values, temperature)
        own = PixelConditionals(cond, 3, c.mixtures, temperature)
        for ch in range(3):
            pmf = own.pmf(ch)
            assert torch.allclose(guided[ch], pmf, atol=1e-12)
            accurate = pmf > 1e-6  # log_pmf against the CDF differences where those are accurate
            assert torch.allclose(own.log_pmf(ch)[accurate], pmf[accurate].log(), atol=1e-8)
            own.observe(ch, values[:, ch])


def test_log_pmf_equals_the_per_bin_log_mass_of_the_coder_in_every_tail():
    """log_pmf (all 256 bins from shared edges) against observe's per-bin formula (_log_bin_mass), for mixtures from
    wide to very sharp (log-scales down to the clamp), after observing earlier channels."""
    from vqprior.models.conditionals import _log_bin_mass

    torch.manual_seed(0)
    values = torch.arange(256, dtype=torch.float64)
    for spread in (0.5, 3.0, 8.0):
        s = PixelConditionals(torch.randn(64, 5 * 10) * spread, 3, 5)
        for ch in range(3):
            log_w = s.log_w - s.log_w.logsumexp(1, keepdim=True)
            ref = torch.logsumexp(log_w.unsqueeze(-1) + _log_bin_mass(values, s._mean(ch).unsqueeze(-1),
                                                                      s.inv_s[:, ch].unsqueeze(-1)), 1)
            got = s.log_pmf(ch)
            assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10), (spread, ch, float((got - ref).abs().max()))
            assert torch.allclose(got.exp().sum(1), torch.ones(64, dtype=torch.float64), atol=1e-12)
            s.observe(ch, torch.randint(0, 256, (64,), dtype=torch.uint8))


# --- W = 0, refusals, the CLI --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["cached", "naive"])
def test_guidance_zero_reproduces_unguided_samples_bit_for_bit(method):
    label = torch.tensor([0, 1, 2, 0])
    for model, kw in ((tiny_prior(3, 3, 5, dtype=torch.float32), dict(temperature=0.8, top_k=3)),
                      (tiny_pixels(), dict(temperature=0.9))):
        runs = [sample(model, 4, method=method, label=label, generator=torch.Generator().manual_seed(5), **kw,
                       **extra) for extra in ({}, dict(guidance=0), dict(guidance=0.0))]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
        guided = sample(model, 4, method=method, label=label, generator=torch.Generator().manual_seed(5), **kw,
                        guidance=1.0)
        assert not torch.equal(runs[0], guided)


def test_guidance_refusals():
    label = torch.tensor([0, 1])
    with pytest.raises(UserError, match="trained with a null class"):
        sample(tiny_prior(null_class=False), 2, label=label, guidance=1.0)
    torch.manual_seed(0)
    plain = PixelSNAIL(model_config_from_preset("tiny", head="pixels", height=2, width=2)).eval()
    with pytest.raises(UserError, match="has no classes"):
        sample(plain, 2, guidance=1.0)
    for bad in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(UserError, match="guidance must be"):
            sample(tiny_prior(), 2, label=label, guidance=bad)
    sample(tiny_prior(null_class=False), 2, label=label, guidance=0)  # W = 0 is off: any model


def test_cli_guided_sampling_of_a_two_level_pair(prior_pipeline, tmp_path):
    p = prior_pipeline
    fast = ["--steps", "1", "--batch-size", "4", "--eval-limit", "4", "--num-samples", "1", "--quiet",
            "--device", "cpu"]
    check_ok(run_cli("train-prior", "--codes", p.train_codes, "--init-from", p.top, "--class-dropout", "0.5", *fast,
                     "--out", tmp_path / "top-null"))
    top = tmp_path / "top-null" / "latest.pt"
    common = ["--bottom", p.bottom, "--num", "6", "--seed", "1", "--quiet", "--device", "cpu"]
    check_ok(run_cli("sample", top, *common, "--save-array", tmp_path / "a.npy"))
    check_ok(run_cli("sample", top, *common, "--guidance", "0", "--save-array", tmp_path / "b.npy"))
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    guided = check_ok(run_cli("sample", top, *common, "--guidance", "3", "--save-codes", tmp_path / "c.npz"))
    assert "guides" not in guided.stderr  # the bottom prior here is not class-conditional: nothing to say
    assert set(np.load(tmp_path / "c.npz")) == {"top", "bottom"}
    # A class-conditional bottom prior without a null class is sampled unguided, and sample says so; with one, both
    # priors are guided and there is nothing to say.
    for name, extra in (("bottom-cond", ["--class-conditional"]), ("bottom-null", ["--class-conditional",
                                                                                  "--class-dropout", "0.5"])):
        check_ok(run_cli("train-prior", "--codes", p.train_codes, "--level", "bottom", "--preset", "tiny", *extra,
                         *fast, "--out", tmp_path / name))
        args = [top, "--bottom", tmp_path / name / "latest.pt", *common[2:], "--guidance", "2", "--save-array",
                tmp_path / f"{name}.npy"]
        stderr = check_ok(run_cli("sample", *args)).stderr
        assert ("guides the top prior only" in stderr) == (name == "bottom-cond"), stderr
    line = [x for x in run_cli("sample", p.top, *common, "--guidance", "1", "--save-array", tmp_path / "d.npy")
            .stderr.splitlines() if x.startswith("Error")]
    assert len(line) == 1 and "--guidance 1 needs a model trained with a null class" in line[0]
    assert not (tmp_path / "d.npy").exists()
