"""Exact causality of PixelSNAIL: the output at p never depends on positions >= p, and with attention every
earlier position has influence (no blind spot), for pixels and codes, with and without conditioning."""
import pytest
import torch

from conftest import tiny_model

H = W = 5


def _perturb_from(x, p, gen):
    """A copy of x whose positions >= p (raster order) are replaced by other random values."""
    flat = x.clone().flatten(-2) if x.dim() == 3 else x.clone().flatten(2)
    if x.dtype == torch.long:
        fresh = torch.randint(0, int(x.max()) + 2, flat.shape, generator=gen) % (int(x.max()) + 1)
        fresh = (flat + 1 + fresh) % (int(x.max()) + 1)  # guaranteed different codes
    else:
        fresh = torch.rand(flat.shape, generator=gen, dtype=x.dtype) * 2 - 1
    flat[..., p:] = fresh[..., p:]
    return flat.view_as(x)


CASES = [
    dict(head="pixels", channels=3),
    dict(head="pixels", channels=1, attention=False),
    dict(head="pixels", channels=3, kernel_size=3, attn_heads=2),
    dict(head="codes", num_codes=4),
    dict(head="codes", num_codes=4, num_classes=3, cond_num_codes=3, cond_height=3, cond_width=3),
]


@pytest.mark.parametrize("overrides", CASES)
def test_output_never_depends_on_current_or_later_positions(overrides):
    model = tiny_model(height=H, width=W, **overrides)
    gen = torch.Generator().manual_seed(1)
    c = model.config
    if c.head == "pixels":
        x = torch.rand(2, c.channels, H, W, generator=gen, dtype=torch.float64) * 2 - 1
    else:
        x = torch.randint(0, c.num_codes, (2, H, W), generator=gen)
    label = torch.tensor([0, 2]) if c.num_classes else None
    cond = torch.randint(0, c.cond_num_codes, (2, c.cond_height, c.cond_width), generator=gen) \
        if c.cond_num_codes else None
    L = H * W
    # Block p of ``perturbed`` is x changed at positions >= p; ``same`` repeats x unchanged. Both go through the
    # model as batches of the same size and layout, so each pair of elements meets exactly the same kernels
    # (fused kernels may round differently by batch position, which is not a dependence on the input).
    perturbed = torch.cat([_perturb_from(x, p, gen) for p in range(L)])
    same = x.repeat(L, *([1] * (x.dim() - 1)))
    rep = lambda t: None if t is None else t.repeat(L, *([1] * (t.dim() - 1)))  # noqa: E731
    with torch.no_grad():
        base = model(same, label=rep(label), condition=rep(cond)).flatten(2).view(L, 2, -1, L)
        other = model(perturbed, label=rep(label), condition=rep(cond)).flatten(2).view(L, 2, -1, L)
    for p in range(L):
        assert torch.equal(base[p, :, :, p], other[p, :, :, p]), f"position {p} sees positions >= {p}"
        if p < L - 1:  # the perturbation is visible later on, so the check above is not vacuous
            assert not torch.equal(base[p, :, :, p + 1:], other[p, :, :, p + 1:])


def _gradient_maps(model):
    """(H*W, H*W) |d output[p] / d input[q]| for every p (rows), from one batched backward pass."""
    c = model.config
    L = H * W
    x = (torch.rand(1, c.channels, H, W, dtype=torch.float64) * 2 - 1).repeat(L, 1, 1, 1).requires_grad_()
    out = model.forward_raw(x).flatten(2)  # (L, P, L): batch element p reads its own position p
    out[torch.arange(L), :, torch.arange(L)].sum().backward()
    return x.grad.abs().sum(1).flatten(1)


@pytest.mark.parametrize("kernel_size", [2, 3])
def test_attention_leaves_no_blind_spot(kernel_size):
    model = tiny_model(height=H, width=W, kernel_size=kernel_size)
    grads = _gradient_maps(model)
    for p in range(H * W):
        g = grads[p]
        assert torch.all(g[:p] > 0), f"position {p} is blind to {torch.nonzero(g[:p] == 0).flatten().tolist()}"
        assert torch.all(g[p:] == 0)


def test_convolution_only_stack_has_blind_spots():
    """Without attention the causal conv stack cannot see e.g. the upper right: the test above would catch it."""
    model = tiny_model(height=H, width=W, attention=False)
    p = 2 * W + 1  # row 2, column 1
    g = _gradient_maps(model)[p]
    assert torch.all(g[p:] == 0)
    assert (g[:p] == 0).any()


def test_codes_every_earlier_position_has_influence_with_conditioning():
    model = tiny_model(height=4, width=4, head="codes", num_codes=4, num_classes=2, cond_num_codes=3,
                       cond_height=2, cond_width=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (1, 4, 4), generator=gen)
    cond = torch.randint(0, 3, (1, 2, 2), generator=gen)
    label = torch.tensor([1])
    L = 16
    changed = x.repeat(L, 1, 1).view(L, L)
    changed[torch.arange(L), torch.arange(L)] = (changed[torch.arange(L), torch.arange(L)] + 1) % 4
    with torch.no_grad():
        base = model(x, label=label, condition=cond).flatten(2)[0]  # (P, L)
        out = model(changed.view(L, 4, 4), label=label.expand(L), condition=cond.expand(L, -1, -1)).flatten(2)
    for q in range(L):  # batch element q changed the code at position q only
        for p in range(q + 1, L):
            assert not torch.equal(base[:, p], out[q, :, p]), f"position {p} is blind to position {q}"
