"""Cached sampling is exact: its per-step parameters equal a full forward pass, and with the same seed it draws the
same samples as the naive sampler, for every model variant (pixels / codes, attention, kernel size, heads,
class and code-map conditioning); completion keeps the prefix; bad inputs raise one-line user errors."""
import pytest
import torch

from conftest import VARIANTS, H, W, make_inputs, make_model, max_step_error
from vqprior.errors import UserError
from vqprior.sampling.sampler import CachedSampler, complete, sample


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_params_equal_forward_float64(variant):
    model = make_model(variant)
    assert max_step_error(model, start=0) < 1e-10
    assert max_step_error(model, start=W + 2) < 1e-10  # caches filled from a prefix ending mid-row


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2"])
def test_cached_params_equal_forward_float32(variant):
    assert max_step_error(make_model(variant, dtype=torch.float32), start=0) < 1e-4


def draw(model, method, seed=0, **kwargs):
    return sample(model, 4, method=method, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_samples(variant):
    model = make_model(variant)
    _, label, cond = make_inputs(model, batch=4)
    cached = draw(model, "cached", label=label, condition=cond)
    assert torch.equal(cached, draw(model, "naive", label=label, condition=cond))
    if model.config.head == "pixels":
        assert cached.dtype == torch.uint8 and cached.shape == (4, model.config.channels, H, W)
    else:
        assert cached.dtype == torch.long and cached.shape == (4, H, W)
        assert 0 <= cached.min() and cached.max() < model.config.num_codes
    assert not torch.equal(cached, draw(model, "cached", seed=1, label=label, condition=cond))


def test_float32_kernel2_same_samples_and_int_label():
    model = make_model("gray-no-attn-class", dtype=torch.float32)
    assert torch.equal(draw(model, "cached", label=2), draw(model, "naive", label=2))


def test_dropout_model_samples_in_eval_mode_and_keeps_train_mode():
    model = make_model("codes", dropout=0.5).train()
    assert torch.equal(draw(model, "cached"), draw(model, "naive"))
    assert model.training


def test_batch_size_and_on_step():
    model = make_model("codes-class-cond-k3-heads2")
    _, label, cond = make_inputs(model, batch=4)
    seen = []
    out = draw(model, "cached", label=label, condition=cond, batch_size=3,
               on_step=lambda p, current: seen.append((p, current.shape[0], int(current[:, p // W, p % W].max()))))
    assert out.shape == (4, H, W)
    assert [p for p, _, _ in seen] == list(range(H * W)) * 2
    assert [b for _, b, _ in seen] == [3] * (H * W) + [1] * (H * W)
    assert torch.equal(out, draw(model, "naive", label=label, condition=cond, batch_size=3))


@pytest.mark.parametrize("variant", ["rgb", "codes-class-cond-k3-heads2"])
def test_completion_keeps_prefix_and_equals_naive(variant):
    model = make_model(variant)
    x, label, cond = make_inputs(model, batch=4)
    start = 2 * W + 3
    cached = draw(model, "cached", label=label, condition=cond, prefix=x, start=start)
    assert torch.equal(cached, draw(model, "naive", label=label, condition=cond, prefix=x, start=start))
    flat, known = cached.reshape(4, -1, H * W), x.reshape(4, -1, H * W)
    assert torch.equal(flat[:, :, :start], known[:, :, :start])
    assert not torch.equal(flat[:, :, start:], known[:, :, start:])
    assert torch.equal(draw(model, "cached", label=label, condition=cond, prefix=x, start=H * W), x)


def test_complete_repeats_each_input():
    model = make_model("codes-class-cond-k3-heads2")
    x, label, cond = make_inputs(model, batch=2)
    g = torch.Generator().manual_seed(3)
    out = complete(model, x, keep_rows=2, num=3, label=label, condition=cond, generator=g)
    assert out.shape == (6, H, W)
    assert torch.equal(out[:, :2], x.repeat_interleave(3, 0)[:, :2])
    one = complete(make_model("rgb"), make_inputs(make_model("rgb"), 1)[0][0], keep_rows=4, num=2)
    assert one.shape == (2, 3, H, W)


def test_code_controls():
    model = make_model("codes")
    base = draw(model, "cached")
    for kwargs in (dict(temperature=0.5), dict(top_k=3), dict(top_p=0.6), dict(temperature=2.0, top_k=2, top_p=0.9)):
        assert torch.equal(draw(model, "cached", **kwargs), draw(model, "naive", **kwargs))
    # top-k = 1 is greedy: the generator no longer matters, and the result differs from plain sampling.
    greedy = draw(model, "cached", top_k=1)
    assert torch.equal(greedy, draw(model, "cached", seed=5, top_k=1))
    assert not torch.equal(greedy, base)


@pytest.mark.parametrize("variant, kwargs, match", [
    ("codes", dict(num=0), "num"),
    ("codes", dict(method="fast"), "method"),
    ("codes", dict(temperature=0.0), "temperature"),
    ("codes", dict(top_k=-1), "top-k"),
    ("codes", dict(top_p=0.0), "top-p"),
    ("rgb", dict(top_k=5), "code priors"),
    ("codes", dict(batch_size=0), "batch size"),
    ("codes", dict(label=1), "not class-conditional"),
    ("gray-no-attn-class", dict(), "class-conditional"),
    ("gray-no-attn-class", dict(label=3), "label outside"),
    ("gray-no-attn-class", dict(label=torch.zeros(3, dtype=torch.long)), "shape"),
    ("codes-cond-no-attn", dict(), "top codes"),
    ("codes-cond-no-attn", dict(condition=torch.zeros(2, 3, 2, dtype=torch.long)), "shape"),
    ("codes-cond-no-attn", dict(condition=torch.full((2, 2, 3), 5)), "outside"),
    ("codes", dict(condition=torch.zeros(2, 2, 3, dtype=torch.long)), "not conditioned"),
    ("codes", dict(start=3), "prefix"),
    ("codes", dict(prefix=torch.zeros(2, H, W + 1, dtype=torch.long), start=3), "shape"),
    ("codes", dict(prefix=torch.zeros(2, H, W, dtype=torch.long), start=H * W + 1), "start"),
    ("codes", dict(prefix=torch.full((2, H, W), 7), start=3), "outside"),
    ("rgb", dict(prefix=torch.zeros(2, 3, H, W), start=3), "uint8"),
])
def test_bad_inputs_raise_user_errors(variant, kwargs, match):
    kwargs = dict(dict(num=2), **kwargs)
    with pytest.raises(UserError, match=match) as info:
        sample(make_model(variant), kwargs.pop("num"), **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_complete_and_step_order():
    model = make_model("codes")
    x = make_inputs(model, 1)[0][0]
    with pytest.raises(UserError, match="keep_rows"):
        complete(model, x, keep_rows=H + 1, num=2)
    with pytest.raises(UserError, match="code map"):
        complete(model, x[None, None], keep_rows=1, num=2)
    with torch.no_grad():
        sampler = CachedSampler(model, 1)
        with pytest.raises(ValueError, match="out of order"):
            sampler.step(1)
        with pytest.raises(ValueError, match="must follow"):
            sampler.append(0, x[:1, 0])
    with pytest.raises(ValueError, match="eval mode"):
        CachedSampler(model.train(), 1)


@pytest.mark.parametrize("static", [False, True])
def test_finished_samplers_are_freed_without_the_cycle_collector(static):
    """No reference cycle keeps a sampler (and its buffers) alive after sampling: with Python's cycle collector off,
    nothing of vqprior.sampling.cached survives sample(), complete(), sample(compile=...) or a dropped CachedSampler (a
    stored bound method once made one sampler's memory pile up per call until the collector ran)."""
    import gc
    import weakref

    model = make_model("codes-class-cond-k3-heads2")
    x, label, cond = make_inputs(model, batch=4)
    gc.collect()
    gc.disable()
    try:
        sampler = CachedSampler(model, 4, label=label, condition=cond, static=static)
        alive = weakref.ref(sampler)
        del sampler
        assert alive() is None
        draw(model, "cached", label=label, condition=cond, batch_size=2)
        complete(model, x, keep_rows=2, num=1, label=label, condition=cond)
        if static:  # compiled (dynamo without a compiler backend): sample() closes the sampler, which drops it
            draw(model, "cached", label=label, condition=cond, compile={"backend": "eager"})
        assert not [o for o in gc.get_objects() if type(o).__module__ == "vqprior.sampling.cached"]
    finally:
        gc.enable()
