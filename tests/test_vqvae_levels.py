"""VQ-VAE hierarchies of any number of levels: level names, code shapes, the top-down conditioning of each level's
encoder, the decoder seeing every level, that 1- and 2-level models are exactly what they were before, and the
prior configs a code cache gives each level (conditioned on the level directly above)."""
import pytest
import torch

from vqprior.config import ConfigError
from vqprior.levels import level_above, level_names
from vqprior.models.vqvae import VQVAE, VQVAEConfig, VQVAEInputError, vqvae_config_from_preset


def make_vqvae(levels, **overrides) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(vqvae_config_from_preset("tiny", levels=levels, **overrides))


def images(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_level_names_keep_top_and_bottom_and_name_the_middles():
    assert level_names(1) == ("top",)
    assert level_names(2) == ("top", "bottom")
    assert level_names(3) == ("top", "middle", "bottom")
    assert level_names(5) == ("top", "middle1", "middle2", "middle3", "bottom")
    assert level_above(level_names(3), "bottom") == "middle" and level_above(level_names(3), "top") is None
    assert level_above(level_names(2), "bottom") == "top"


@pytest.mark.parametrize("levels", [3, 4])
def test_code_shapes_each_level_top_stride_coarser(levels):
    vq = make_vqvae(levels, bottom_stride=2, top_stride=2)
    size = 2 * 2 ** (levels - 1) * 2  # two codes per side at the top
    x = images(size=size)
    vq.init_codebooks(x)
    codes = vq.encode(x)
    assert vq.level_names == level_names(levels)
    expected = [(2 * 2 ** i, 2 * 2 ** i) for i in range(levels)]
    assert [tuple(c.shape[1:]) for c in codes] == expected == vq.code_shapes(size, size)
    assert vq.config.level_strides() == [size // s[0] for s in expected]
    out = vq.decode(codes)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(vq.reconstruct(x), out)  # decode(encode(x)) is the reconstruction
    assert len(vq(x)["stats"]) == levels


def test_paper_ffhq_1024_layout():
    """VQ-VAE-2's FFHQ 1024x1024 model: 128x128 bottom, 64x64 middle and 32x32 top codes."""
    c = VQVAEConfig(levels=3, bottom_stride=8, top_stride=2)
    assert c.level_strides() == [32, 16, 8] and c.total_stride == 32
    vq = VQVAE(VQVAEConfig(levels=3, bottom_stride=8, top_stride=2, hidden=4, embed_dim=2, res_blocks=0,
                           codebook_size=4))
    assert vq.code_shapes(1024, 1024) == [(32, 32), (64, 64), (128, 128)]


def test_each_level_is_conditioned_on_the_level_above_and_the_decoder_sees_every_level():
    vq = make_vqvae(3).eval()
    x = images()
    vq.init_codebooks(x)
    codes = vq.encode(x)
    # Top-down: the middle codes depend on the top codes (through decoder_top), the bottom ones on the middle codes.
    with torch.no_grad():
        vq.decoder_top[0].bias.add_(5.0)
    changed = vq.encode(x)
    assert torch.equal(changed[0], codes[0]) and not torch.equal(changed[1], codes[1])
    vq = make_vqvae(3).eval()
    vq.init_codebooks(x)
    with torch.no_grad():
        vq.decoder_middle[0][0].bias.add_(5.0)
    changed = vq.encode(x)
    assert torch.equal(changed[0], codes[0]) and torch.equal(changed[1], codes[1])
    assert not torch.equal(changed[2], codes[2])
    # The decoder reads all three levels: changing any one level's codes changes the images.
    base = vq.decode(codes)
    for i in range(3):
        other = [c.clone() for c in codes]
        other[i] = (other[i] + 1) % vq.config.codebook_size
        assert not torch.equal(vq.decode(other), base), vq.level_names[i]


def test_three_level_codes_are_checked_against_each_level_above():
    vq = make_vqvae(3)
    top, mid, bot = torch.zeros(2, 2, 2, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long), \
        torch.zeros(2, 8, 8, dtype=torch.long)
    assert vq.decode([top, mid, bot]).shape == (2, 3, 16, 16)
    with pytest.raises(VQVAEInputError, match="3 level"):
        vq.decode([top, bot])
    with pytest.raises(VQVAEInputError, match="bottom codes must have shape"):
        vq.decode([top, mid, torch.zeros(2, 4, 4, dtype=torch.long)])
    with pytest.raises(VQVAEInputError, match="middle codes must have shape"):
        vq.decode([top, bot, bot])


def test_levels_out_of_range_are_config_errors():
    with pytest.raises(ConfigError, match="levels"):
        VQVAEConfig(levels=0)
    with pytest.raises(ConfigError, match="levels"):
        VQVAEConfig(levels=9)


def _old_two_level_forward(vq, x):
    """The two-level model exactly as it was written before N levels: the reference the refactor must match."""
    x = vq._to_unit(x)
    h = vq.encoder(x)
    q_top = vq.quantizers[0](vq.pre_quant_top(vq.encoder_top(h)))
    q_bottom = vq.quantizers[1](vq.pre_quant(torch.cat([h, vq.decoder_top(q_top["quantized"])], 1)))
    recon = vq.decoder(torch.cat([vq.upsample_top(q_top["quantized"]), q_bottom["quantized"]], 1))
    return [q_top["codes"], q_bottom["codes"]], recon


def _old_parameter_names(levels):
    names = ["encoder"] + (["encoder_top", "pre_quant_top", "decoder_top", "upsample_top"] if levels == 2 else [])
    return names + ["pre_quant", "quantizers", "decoder"]


@pytest.mark.parametrize("levels", [1, 2])
def test_one_and_two_level_models_are_unchanged(levels):
    """Same modules in the same order (so old checkpoints and optimizer states load, and a seed builds the same
    weights), and for two levels the same codes and reconstructions as the original formula."""
    vq = make_vqvae(levels)
    assert [name for name, _ in vq.named_children()] == _old_parameter_names(levels)
    if levels == 1:
        return
    x = images()
    vq.init_codebooks(x)
    codes, recon = _old_two_level_forward(vq, x)
    out = vq(x)
    assert all(torch.equal(a, b) for a, b in zip(out["codes"], codes))
    assert torch.equal(out["recon"], recon)


def _meta(levels, shapes, sizes):
    return {"levels": levels, "level_names": list(level_names(levels)), "shapes": shapes, "codebook_sizes": sizes,
            "num_classes": 0}


def test_prior_configs_condition_on_the_level_directly_above():
    from vqprior.config import model_config_from_preset
    from vqprior.errors import UserError
    from vqprior.training.prior_task import check_prior_against_cache, prior_model_config

    meta3 = _meta(3, [[2, 2], [4, 4], [8, 8]], [5, 6, 7])
    base = model_config_from_preset("tiny", head="codes", num_codes=2)
    configs = {name: prior_model_config(base, meta3, name) for name in level_names(3)}
    got = {name: (c.num_codes, c.height, c.cond_num_codes, c.cond_height, c.cond_width)
           for name, c in configs.items()}
    assert got == {"top": (5, 2, 0, 0, 0), "middle": (6, 4, 5, 2, 2), "bottom": (7, 8, 6, 4, 4)}
    for name, c in configs.items():
        check_prior_against_cache(c, meta3, name)
    # The bottom prior of a 2-level VQ-VAE with the same bottom map reads 2x2 top codes, not the 4x4 middle ones.
    meta2 = _meta(2, [[2, 2], [8, 8]], [5, 7])
    with pytest.raises(UserError, match="middle-code condition"):
        check_prior_against_cache(prior_model_config(base, meta2, "bottom"), meta3, "bottom")
    with pytest.raises(UserError, match="no middle level"):
        prior_model_config(base, meta2, "middle")
