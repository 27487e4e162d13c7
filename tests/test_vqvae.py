"""VQ-VAE: shapes of encode/decode (1 and 2 levels), input checks, the explicit EMA codebook update, dead-code
restart, training progress, the training task's metrics and grid, config strictness and checkpoint round trip."""
import math

import pytest
import torch

from vqprior.checkpoint import build_model, read_checkpoint, save_checkpoint
from vqprior.config import ConfigError, DataConfig
from vqprior.errors import UserError
from vqprior.evaluation.metrics import psnr_from_mse
from vqprior.models.quantizer import VectorQuantizer, measure_codes
from vqprior.models.vqvae import VQVAE, VQVAEConfig, vqvae_config_from_preset
from vqprior.training.vqvae_task import VQVAETask


def make_vqvae(levels=1, channels=3, **overrides) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(vqvae_config_from_preset("tiny", levels=levels, channels=channels, **overrides))


def images(n=4, channels=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def smooth_images(n=8, size=8, seed=0):
    """Low-frequency colour blobs: structure a tiny VQ-VAE can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 2, 2, generator=g)
    return (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
            * 255).round().to(torch.uint8)


@pytest.mark.parametrize("levels,channels,size", [(1, 3, 8), (2, 3, 8), (1, 1, 16), (2, 1, 16)])
def test_encode_decode_shapes(levels, channels, size):
    vq = make_vqvae(levels, channels)
    x = images(3, channels, size)
    vq.init_codebooks(x)
    codes = vq.encode(x)
    assert len(codes) == levels
    assert [tuple(c.shape[1:]) for c in codes] == vq.code_shapes(size, size)
    for c in codes:
        assert c.dtype == torch.int64 and c.shape[0] == 3
        assert 0 <= int(c.min()) and int(c.max()) < vq.config.codebook_size
    out = vq.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, vq.reconstruct(x))
    if levels == 2:  # the top level is coarser by top_stride
        assert codes[1].shape[1] == codes[0].shape[1] * vq.config.top_stride


def test_small_preset_layout_for_32x32():
    assert VQVAE(vqvae_config_from_preset("small", levels=1)).code_shapes(32, 32) == [(8, 8)]
    assert VQVAE(vqvae_config_from_preset("small", levels=2)).code_shapes(32, 32) == [(4, 4), (8, 8)]


def test_decode_rejects_bad_codes_with_one_line_errors():
    vq = make_vqvae(levels=2)
    top, bottom = vq.encode(images())
    K = vq.config.codebook_size
    bad_inputs = [
        [top],  # one level missing
        [top.clone().fill_(K), bottom],  # outside the codebook
        [top, bottom.clone().fill_(-1)],
        [top, bottom[:, :2]],  # wrong bottom shape for these tops
        [top.float(), bottom],  # not integers
        top,  # a tensor, not a list
    ]
    for codes in bad_inputs:
        with pytest.raises(ValueError) as info:
            vq.decode(codes)
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="stride"):
        vq.encode(images(size=6))
    with pytest.raises(UserError, match="channels|shape"):
        vq.encode(images(channels=1))


def test_forward_never_changes_codebooks_update_does():
    vq = make_vqvae(levels=2)
    x = images(8)
    vq.init_codebooks(x)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    out = vq(x)
    vq.train()
    out = vq(x)
    out["loss"].backward()
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    vq.update_codebooks(out)
    for i in range(2):
        assert not torch.equal(before[f"quantizers.{i}.embedding"], vq.quantizers[i].embedding)
        assert not torch.equal(before[f"quantizers.{i}.cluster_size"], vq.quantizers[i].cluster_size)


def test_ema_update_with_zero_decay_moves_codes_to_centroids():
    q = VectorQuantizer(num_codes=4, dim=2, decay=0.0, dead_code_threshold=0.0)
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    inputs = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [8.0, 0.0], [1.0, 9.0], [9.0, 9.0]])
    z = inputs.t().reshape(1, 2, 1, 7)
    out = q(z)
    assert out["codes"].flatten().tolist() == [0, 0, 1, 1, 1, 2, 3]
    q.update_codebook(out["inputs"], out["codes"])
    expected = torch.stack([inputs[0:2].mean(0), inputs[2:5].mean(0), inputs[5], inputs[6]])
    assert torch.allclose(q.embedding, expected, atol=1e-3)
    assert q.cluster_size.tolist() == [2.0, 3.0, 1.0, 1.0]


def test_dead_code_restart_moves_unused_codes_onto_batch_vectors():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=4, dim=3, decay=0.99, dead_code_threshold=1.0)
    q.embedding[3] = 1e6  # never the nearest code: it dies
    z = torch.randn(1, 3, 4, 4)
    q.cluster_size.fill_(5.0)
    q.cluster_size[3] = 0.5
    out = q(z)
    assert 3 not in out["codes"].flatten().tolist()
    alive_before = q.embedding[:3].clone()
    restarted = q.update_codebook(out["inputs"], out["codes"])
    assert restarted == 1
    flat = out["inputs"]
    assert (flat - q.embedding[3]).abs().sum(1).min() < 1e-6  # now one of the batch's encoder outputs
    assert q.cluster_size[3] == pytest.approx(1.0)
    assert not torch.allclose(q.embedding[:3], torch.full_like(alive_before, 1e6))


def test_gradients_pass_straight_through_to_the_encoder():
    vq = make_vqvae(levels=2)
    vq(images())["loss"].backward()
    assert vq.encoder[0].weight.grad is not None and vq.encoder[0].weight.grad.abs().sum() > 0
    assert vq.encoder_top[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("levels", [1, 2])
def test_training_reduces_the_loss_on_a_fixed_batch(levels):
    task = VQVAETask(vqvae_config_from_preset("tiny", levels=levels), DataConfig())
    torch.manual_seed(0)
    model = task.build_model()
    batch = {"image": smooth_images(8), "label": torch.zeros(8, dtype=torch.long), "index": torch.arange(8)}
    task.init_model(model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, metrics = task.loss(model.train(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in metrics.values())
    assert {"mse", "commitment", "perplexity_top"} <= set(metrics)
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])


def test_task_evaluate_and_grid():
    task = VQVAETask(vqvae_config_from_preset("tiny", levels=2), DataConfig())
    model = task.build_model().eval()
    x = images(10)
    model.init_codebooks(x)
    batches = [{"image": x[:6]}, {"image": x[6:]}]
    result = task.evaluate(model, batches)
    recon = model.reconstruct(x)
    mse = float((recon.double() - x.double()).pow(2).mean())
    assert result["mse"] == pytest.approx(mse, rel=1e-6)
    assert result["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-6)
    codes = model.encode(x)
    for name, c in zip(("top", "bottom"), codes):
        assert result[f"usage_{name}"] == pytest.approx(measure_codes(c, 16)["usage"])
        assert 1.0 <= result[f"perplexity_{name}"] <= 16.0
    grid = task.grid(model, {"image": x}, torch.Generator())
    assert grid.dtype == torch.uint8 and grid.shape == (16, 3, 8, 8) and task.grid_nrow == 8
    assert torch.equal(grid[:8], x[:8]) and torch.equal(grid[8:], recon[:8])
    assert psnr_from_mse(0.0) == float("inf")


def test_config_is_strict_and_round_trips():
    c = vqvae_config_from_preset("tiny", levels=2, codebook_size=32, channels=None)
    assert VQVAEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown"):
        VQVAEConfig.from_dict({**c.to_dict(), "typo": 1})
    with pytest.raises(ConfigError, match="preset"):
        vqvae_config_from_preset("huge")
    for bad in (dict(levels=0), dict(levels=9), dict(codebook_size=70000), dict(bottom_stride=3), dict(decay=1.0),
                dict(channels=2)):
        with pytest.raises(ConfigError):
            vqvae_config_from_preset("tiny", **bad)


def test_checkpoint_round_trip(tmp_path):
    task = VQVAETask(vqvae_config_from_preset("tiny", levels=2), DataConfig())
    model = task.build_model()
    x = images(4)
    model.init_codebooks(x)
    model.update_codebooks(model(x))
    save_checkpoint(tmp_path / "vq.pt", {"kind": "vqvae", "config": task.config_dicts(), "model": model.state_dict(),
                                         "step": 1, **task.extra_checkpoint()})
    loaded = build_model(read_checkpoint(tmp_path / "vq.pt", "vqvae"))
    assert isinstance(loaded, VQVAE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), model.encode(x)))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
