"""Lossless compression (vqprior.compress): the channel-by-channel conditionals are the model's mixture, the
integer tables are what the coder codes, round trips are bit-exact (pixels RGB and grayscale, code maps with one
and two levels, batch 1 and > 1, partial last chunks), the file size is the model's -log2 p(x) within 1% plus the
header, and every file that cannot be decoded as asked is refused with a one-line error."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from conftest import images_for, pixel_model, tiny_model
from vqprior.compress import compress_codes, compress_images, decompress_codes, decompress_images, unpack
from vqprior.compress.container import CompressedFileError
from vqprior.compress.tables import TOTAL, quantize
from vqprior.errors import UserError
from vqprior.models.conditionals import PixelConditionals
from vqprior.models.distributions import logistic_mixture_log_prob, uint8_to_unit

pytest.importorskip("constriction")

COND = dict(cond_num_codes=6, cond_height=2, cond_width=3)


@torch.no_grad()
def model_bits(models, arrays, labels=None) -> float:
    """-log2 p(data) straight from model.log_prob (labels, when given, cost log2(classes) bits each)."""
    nats = 0.0
    for i, (m, x) in enumerate(zip(models, arrays)):
        lab = labels if m.config.num_classes else None
        nats -= float(m.log_prob(x, condition=arrays[0] if i else None, label=lab).double().sum())
    extra = arrays[0].shape[0] * math.log2(models[0].config.num_classes) if labels is not None else 0.0
    return nats / math.log(2) + extra


# ---- the tables ------------------------------------------------------------------------------------------------

def reference_log_prob(params, x, channels, M):
    """log p(x) of the joint discretized logistic mixture, in float64, written out directly: per component, the
    coupled means (G += c0 R, B += c1 R + c2 G), each channel's bin mass as a CDF difference (taken from the upper
    tail above the mean so that small masses keep their digits), summed over channels, then mixed."""
    B = params.shape[0]
    logits = params[:, :M]
    rest = params[:, M:].view(B, -1, M)
    means, log_s = rest[:, :channels], rest[:, channels:2 * channels].clamp(min=-7.0)
    v = x.double() / 127.5 - 1.0  # (B, C)
    if channels == 3:
        c = torch.tanh(rest[:, 6:9])
        means = torch.stack([means[:, 0], means[:, 1] + c[:, 0] * v[:, :1],
                             means[:, 2] + c[:, 1] * v[:, :1] + c[:, 2] * v[:, 1:2]], 1)
    inv_s = torch.exp(-log_s)
    a = (v.unsqueeze(-1) - 1 / 255 - means) * inv_s
    b = (v.unsqueeze(-1) + 1 / 255 - means) * inv_s
    a = torch.where(x.unsqueeze(-1) == 0, torch.full_like(a, -math.inf), a)
    b = torch.where(x.unsqueeze(-1) == 255, torch.full_like(b, math.inf), b)
    mass = torch.where(a > 0, torch.sigmoid(-a) - torch.sigmoid(-b), torch.sigmoid(b) - torch.sigmoid(a))
    return torch.logsumexp(torch.log_softmax(logits, 1) + mass.log().sum(1), 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_channel_conditionals_multiply_to_the_joint_mixture(channels):
    """prod_c p(x_c | x_<c) (the PixelCNN++ factorization, weights = posterior over components) equals the joint
    discretized-logistic-mixture probability, and each conditional sums to 1 over the 256 values."""
    g = torch.Generator().manual_seed(0)
    M, B = 4, 64
    P = M * (1 + 2 * channels + (3 if channels == 3 else 0))
    params = torch.randn(B, P, generator=g, dtype=torch.float64) * 2
    x = torch.randint(0, 256, (B, channels), generator=g, dtype=torch.uint8)
    x[:4] = 0  # the edge bins
    x[4:8] = 255
    mix = PixelConditionals(params, channels, M)
    log_p = torch.zeros(B, dtype=torch.float64)
    for c in range(channels):
        pmf = mix.pmf(c)
        assert torch.allclose(pmf.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-12)
        log_p += pmf.gather(1, x[:, c:c + 1].long()).squeeze(1).log()
        mix.observe(c, x[:, c])
    assert torch.allclose(log_p, reference_log_prob(params, x, channels, M), rtol=1e-9, atol=1e-9)
    # The model's own scorer agrees too, up to its density-at-the-centre shortcut for bins of mass < 1e-5.
    joint = logistic_mixture_log_prob(uint8_to_unit(x, torch.float64).view(B, channels, 1, 1),
                                      params.view(B, P, 1, 1), M).view(B)
    assert (log_p - joint).abs().median() < 1e-9 and (log_p - joint).abs().max() < 1e-2


def test_quantize_keeps_every_symbol_codable_and_sums_exactly():
    rng = np.random.default_rng(0)
    pmf = rng.dirichlet(np.full(256, 0.05), size=200)  # very peaked rows, many tiny probabilities
    pmf[0] = 0.0
    pmf[0, 7] = 1.0  # a certain symbol: the other 255 still get mass
    q = quantize(pmf)
    assert q.dtype == np.int64 and (q >= 1).all() and (q.sum(1) == TOTAL).all()
    assert q[0, 7] == TOTAL - 255
    assert np.array_equal(q, quantize(pmf.copy()))
    # Close to the float probabilities: coding with q costs at most a tiny fraction of a bit more on average.
    kl = (pmf * (np.log2(np.maximum(pmf, 1e-300)) - np.log2(q / TOTAL))).sum(1)
    assert kl.max() < 1e-3
    with pytest.raises(UserError, match="non-finite"):
        quantize(np.full((1, 4), np.nan))


def test_the_range_coder_codes_exactly_our_integer_probabilities():
    """A symbol of frequency q costs exactly 24 - log2(q) bits: constriction codes our integers, not a re-quantized
    copy of them."""
    from vqprior.compress.coding import Encoder

    for q_symbol, bits in ((1, 24), (2, 23), (256, 16)):
        table = np.ones((2000, 256), np.int64)
        table[:, 9] = TOTAL - 255 - (q_symbol - 1)
        table[:, 3] = q_symbol
        enc = Encoder()
        enc.code(table, np.full(2000, 3))
        assert abs(8 * len(enc.finish()) - 2000 * bits) <= 64


# ---- round trips and sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,n,chunk", [(3, 1, 64), (3, 7, 3), (1, 1, 64), (1, 5, 2)])
def test_pixels_round_trip_bit_exact_and_size_is_minus_log2_p(channels, n, chunk):
    model = pixel_model(channels)
    x = images_for(model, n)
    data, stats = compress_images(model, x, chunk=chunk)
    y, names = decompress_images(model, data)
    assert y.dtype == torch.uint8 and torch.equal(y, x) and names is None
    bits = model_bits([model], [x])
    header = stats["header_bytes"]
    assert header <= 160  # fixed: magic, shapes, model sha256, environment, data sha256, lengths, CRC
    payload_bits = 8 * (len(data) - header)
    assert 0.99 * bits <= payload_bits <= 1.01 * bits + 64, (payload_bits, bits)  # 64: the coder's final words
    assert stats["model_bits"] == pytest.approx(bits, rel=1e-6)


def test_float64_model_and_names_round_trip():
    model = pixel_model(3, dtype=torch.float64)
    x = images_for(model, 3, smooth=False)
    data, _ = compress_images(model, x, chunk=2, names=["a.png", "b.png", "c.png"])
    y, names = decompress_images(model, data)
    assert torch.equal(y, x) and names == ["a.png", "b.png", "c.png"]


def test_class_conditional_pixels_store_the_cheapest_label():
    model = pixel_model(1, num_classes=3)
    x = images_for(model, 4)
    data, stats = compress_images(model, x, chunk=3)
    assert torch.equal(decompress_images(model, data)[0], x)
    best = min(model_bits([model], [x[:1]], torch.tensor([y])) for y in range(3))
    one, _ = compress_images(model, x[:1])
    assert 8 * len(unpack(one).payload) <= 1.01 * best + 64


def code_priors(seed=0, levels=2, top_classes=3):
    top = tiny_model(seed, torch.float32, head="codes", num_codes=6, height=2, width=3, num_classes=top_classes)
    if levels == 1:
        return [top]
    return [top, tiny_model(seed + 1, torch.float32, head="codes", num_codes=5, height=4, width=6, **COND)]


def codes_for(priors, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, p.config.num_codes, (n, p.config.height, p.config.width), generator=g) for p in priors]


@pytest.mark.parametrize("levels,n,chunk", [(2, 1, 64), (2, 6, 4), (1, 3, 2)])
def test_codes_round_trip_bit_exact_and_size_is_minus_log2_p(levels, n, chunk):
    priors = code_priors(levels=levels)
    codes = codes_for(priors, n)
    data, stats = compress_codes(priors, codes, chunk=chunk)
    back = decompress_codes(priors, data)
    assert len(back) == levels and all(torch.equal(a, b) for a, b in zip(back, codes))
    # Labels are chosen per item (the cheapest); the size matches -log2 p under the labels chosen.
    with torch.no_grad():
        scores = torch.stack([sum(p.log_prob(c, condition=codes[0] if i else None,
                                             label=torch.full((n,), y) if p.config.num_classes else None)
                                  .double().flatten(1).sum(1) for i, (p, c) in enumerate(zip(priors, codes)))
                              for y in range(3)], 1)
    bits = float(-scores.max(1).values.sum()) / math.log(2) + n * math.log2(3)
    payload_bits = 8 * (len(data) - stats["header_bytes"])
    assert stats["model_bits"] == pytest.approx(bits, rel=1e-6)
    assert payload_bits <= 1.01 * bits + 64 and payload_bits >= 0.99 * bits - 64


def test_three_levels_round_trip_and_each_prior_is_coded_given_the_level_above():
    """top 2x3, middle 4x6 given the top, bottom 8x12 given the middle: exact, and the size is -log2 p of that
    chain (not of one where every prior sees the top codes)."""
    top, middle = code_priors()
    bottom = tiny_model(3, torch.float32, head="codes", num_codes=4, height=8, width=12, cond_num_codes=5,
                        cond_height=4, cond_width=6)
    priors = [top, middle, bottom]
    codes = codes_for(priors, 3)
    data, stats = compress_codes(priors, codes, chunk=2)
    back = decompress_codes(priors, data)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, codes))
    with torch.no_grad():
        scores = torch.stack([sum(p.log_prob(c, condition=codes[i - 1] if i else None,
                                             label=torch.full((3,), y) if p.config.num_classes else None)
                                  .double().flatten(1).sum(1) for i, (p, c) in enumerate(zip(priors, codes)))
                              for y in range(3)], 1)
    bits = float(-scores.max(1).values.sum()) / math.log(2) + 3 * math.log2(3)
    assert stats["model_bits"] == pytest.approx(bits, rel=1e-6)
    payload_bits = 8 * (len(data) - stats["header_bytes"])
    assert payload_bits <= 1.01 * bits + 64 and payload_bits >= 0.99 * bits - 64
    with pytest.raises(CompressedFileError, match="3 prior"):
        decompress_codes([top, middle], data)


# ---- refusals --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coded():
    model = pixel_model(3)
    x = images_for(model, 3)
    return model, x, compress_images(model, x, chunk=2)[0]


def refit_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


@pytest.mark.parametrize("damage,match", [
    (lambda d: d[:-10], "corrupt or truncated"),
    (lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:], "corrupt or truncated"),
    (lambda d: d[:-20] + bytes([d[-20] ^ 0x10]) + d[-19:], "corrupt or truncated"),
    (lambda d: b"PK\x03\x04" + d[4:], "not a vqprior compressed file"),
    (lambda d: b"", "not a vqprior compressed file"),
    (lambda d: d[:4] + bytes([9]) + d[5:], "newer than this vqprior"),
    (lambda d: refit_crc(d[:-24] + bytes(20) + d[-4:]), "fail the checksum"),  # the payload's end zeroed, CRC refit
    (lambda d: refit_crc(d[:-4] + b"xx" + d[-4:]), "truncated|trailing"),
])
def test_damaged_files_are_refused(coded, damage, match):
    model, _, data = coded
    with pytest.raises(CompressedFileError, match=match):
        decompress_images(model, damage(data))


def test_another_model_is_refused(coded):
    _, _, data = coded
    with pytest.raises(CompressedFileError, match="another model"):
        decompress_images(pixel_model(3, seed=5), data)
    with pytest.raises(CompressedFileError, match="holds pixels"):
        decompress_codes(code_priors(), data)


def test_different_probabilities_are_refused_never_a_wrong_image(coded, monkeypatch):
    """A decoder whose floats differ from the encoder's (another torch build, device or CPU kernel) decodes other
    values; the data checksum turns that into an error."""
    model, _, data = coded
    original = PixelConditionals.pmf

    def skewed(self, c):
        p = original(self, c)
        p[:, :128] *= 1.3
        return p / p.sum(1, keepdim=True)

    monkeypatch.setattr(PixelConditionals, "pmf", skewed)
    with pytest.raises(CompressedFileError, match="fail the checksum"):
        decompress_images(model, data)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 3, 6, 5), "uint8"),
    (torch.zeros(3, 6, 5, dtype=torch.uint8), r"\(N, C, H, W\)"),
    (torch.zeros(2, 1, 6, 5, dtype=torch.uint8), "3-channel"),
    (torch.zeros(0, 3, 6, 5, dtype=torch.uint8), "no items"),
])
def test_bad_images_are_refused(bad, match):
    with pytest.raises(CompressedFileError, match=match):
        compress_images(pixel_model(3), bad)


def test_bad_codes_are_refused():
    priors = code_priors()
    codes = codes_for(priors, 2)
    with pytest.raises(CompressedFileError, match="outside the codebook"):
        compress_codes(priors, [codes[0], codes[1] + 5])
    with pytest.raises(CompressedFileError, match="must be 2x3"):
        compress_codes(priors, [codes[1], codes[1]])
    with pytest.raises(CompressedFileError, match="integer"):
        compress_codes(priors, [codes[0].float(), codes[1]])
    with pytest.raises(CompressedFileError, match="2 code map level"):
        compress_codes(priors, codes[:1])
    data, _ = compress_codes(priors, codes)
    with pytest.raises(CompressedFileError, match="2 prior"):
        decompress_codes(priors[:1], data)
