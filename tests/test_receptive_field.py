"""Receptive fields: attention removes the blind spots of the convolution stack; the heat map and the CLI."""
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vqprior.checkpoint import save_checkpoint
from vqprior.commands.receptive_field import receptive_field
from vqprior.config import model_config_from_preset
from vqprior.models.pixelsnail import PixelSNAIL
from vqprior.models.receptive_field import (
    FUTURE_RGB,
    TARGET_RGB,
    compute_receptive_field,
    render_receptive_field,
    summarize_receptive_field,
)

SIZE = 8


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PixelSNAIL(model_config_from_preset("tiny", height=SIZE, width=SIZE, **overrides))


def grad_map(model, position):
    return compute_receptive_field(model, position, generator=torch.Generator().manual_seed(0))


def raster(position):
    return position[0] * SIZE + position[1]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(head="codes", num_codes=7, num_classes=3, cond_num_codes=5, cond_height=4, cond_width=4),
], ids=["pixels", "codes-conditioned"])
@pytest.mark.parametrize("position", [(4, 4), (1, 0), (7, 7)])
def test_attention_reaches_every_earlier_position_and_no_later_one(overrides, position):
    g = grad_map(make_model(**overrides), position)
    assert g.shape == (SIZE, SIZE) and g.dtype == torch.float64
    flat, p = g.flatten(), raster(position)
    assert (flat[:p] > 0).all(), f"blind spots at {torch.nonzero(flat[:p] == 0).flatten().tolist()}"
    assert (flat[p:] == 0).all()
    assert summarize_receptive_field(g, position).blind == 0


def test_without_attention_the_upper_right_is_blind():
    position = (4, 4)
    g = grad_map(make_model(attention=False), position)
    flat, p = g.flatten(), raster(position)
    assert (flat[p:] == 0).all()
    # Shifted convolutions only grow up and to the left; the stem reaches one column right of the target in the row
    # above, so columns beyond c + 1 in earlier rows are out of reach of a convolution-only stack.
    assert (g[:4, 6:] == 0).all()
    assert g[3, 4] > 0 and g[3, 5] > 0 and g[4, 3] > 0  # the neighbours are seen
    summary = summarize_receptive_field(g, position)
    assert summary.blind == int((flat[:p] == 0).sum()) > 0
    assert summary.later_reached == 0


def test_compute_leaves_the_model_and_global_rng_alone():
    model = make_model()
    model.train()
    state = torch.random.get_rng_state()
    grad_map(model, (2, 3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_compute_rejects_a_position_outside_the_map():
    with pytest.raises(ValueError, match="outside"):
        grad_map(make_model(), (SIZE, 0))


def test_render_marks_blind_spots_target_and_future():
    position = (4, 4)
    g = grad_map(make_model(attention=False), position)
    image = render_receptive_field(g, position, scale=3)
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE * 3, SIZE * 3)

    def cell(r, c):  # every pixel of an upscaled cell has the cell's colour
        block = image[:, 3 * r:3 * r + 3, 3 * c:3 * c + 3].flatten(1)
        assert (block == block[:, :1]).all()
        return tuple(block[:, 0].tolist())

    assert cell(*position) == TARGET_RGB
    assert cell(2, 7) == (0, 0, 0)  # a blind spot is exactly black
    assert cell(6, 1) == FUTURE_RGB  # later positions are marked as excluded, not blind
    for r, c in [(3, 4), (4, 3), (0, 0)]:  # reached positions are visibly coloured, never black
        assert cell(r, c) not in {(0, 0, 0), FUTURE_RGB, TARGET_RGB}
    # Log scale: a stronger gradient is never drawn darker than a weaker one.
    nonzero = [(g[r, c].item(), sum(cell(r, c))) for r in range(SIZE) for c in range(SIZE)
               if g[r, c] > 0 and (r, c) != position]
    nonzero.sort()
    assert all(a[1] <= b[1] for a, b in zip(nonzero, nonzero[1:]))


def test_cli_compare_writes_two_panels(tmp_path):
    out = tmp_path / "rf.png"
    result = CliRunner().invoke(receptive_field, ["--preset", "tiny", "--size", str(SIZE), "--compare",
                                                  "--position", "4,4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "tiny with attention: position 4,4: 36 of 36 earlier positions reach the output (0 blind)" in result.output
    assert "tiny without attention" in result.output and "(0 blind)" not in result.output.splitlines()[1]
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.width > 2 * im.height * 0.9  # two panels side by side


def test_cli_checkpoint_writes_a_png(tmp_path):
    model = make_model(head="codes", num_codes=6)
    ckpt = tmp_path / "prior.pt"
    save_checkpoint(ckpt, {"kind": "pixels", "config": {"model": model.config.to_dict()},
                           "model": model.state_dict()})
    out = tmp_path / "rf.png"
    result = CliRunner().invoke(receptive_field, [str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "position 4,4: 36 of 36" in result.output  # the default position is the centre
    with Image.open(out) as im:
        assert im.width == im.height >= 256


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny", "--size", "8", "--position", "8,0"], "outside the 8x8 map"),
    (["--preset", "tiny", "--size", "8", "--position", "-1,2"], "outside the 8x8 map"),
    (["--preset", "tiny", "--position", "a,b"], "expected R,C"),
    (["--preset", "tiny", "--position", "3"], "expected R,C"),
    ([], "either a checkpoint CKPT or --preset"),
    (["CKPT", "--preset", "tiny"], "either a checkpoint CKPT or --preset"),
    (["CKPT", "--compare"], "--compare applies to --preset only"),
    (["--preset", "tiny", "--compare", "--no-attention"], "drop --no-attention"),
    (["--preset", "nope"], "unknown preset"),
    (["missing.pt"], "checkpoint not found"),
])
def test_cli_rejects_bad_input_with_one_line(tmp_path, args, message):
    out = tmp_path / "rf.png"
    args = [str(tmp_path / "x.pt") if a == "CKPT" else a for a in args]
    result = CliRunner().invoke(receptive_field, args + ["--out", str(out)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    assert "Traceback" not in result.output and message in result.output
    assert not out.exists()
