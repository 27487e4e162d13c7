"""Saying what happened: every held-out evaluation during training is a line on stderr; long work (the final
evaluation, sampling) shows a progress bar unless --quiet; ``complete`` with a code prior shows what the prior
conditions on (the re-encoded kept rows, decoded), not the original pixels."""
import re

import numpy as np
from PIL import Image

from cli_support import TINY_TRAIN, check_ok, run_cli, train_pixel_run
from vqprior.checkpoint import load_model
from vqprior.images import load_image
from vqprior.sampling.generate import generate


def test_every_evaluation_is_a_line_on_stderr(tmp_path):
    result = train_pixel_run(tmp_path / "run", "--eval-every", "2", steps=4, limit=16)
    lines = re.findall(r"^step (\d+) eval: bpd ([\d.]+)$", result.stderr, re.MULTILINE)
    assert [step for step, _ in lines] == ["2", "4"], result.stderr
    assert all(float(bpd) > 0 for _, bpd in lines)


def test_prior_and_vqvae_evaluations_are_lines_on_stderr(prior_pipeline):
    last = prior_pipeline.steps  # the trainers evaluate at their last step
    top = prior_pipeline.results["train-prior-top"].stderr
    assert re.search(rf"^step {last} eval: bits_per_code [\d.]+$", top, re.MULTILINE), top
    vq = prior_pipeline.results["train-vqvae"].stderr
    assert re.search(rf"^step {last} eval: mse [\d.]+, psnr [\d.]+, ", vq, re.MULTILINE), vq


def test_final_evaluation_shows_a_progress_bar_unless_quiet(tmp_path):
    shown = [a for a in TINY_TRAIN if a != "--quiet"]
    result = check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "8",
                              "--steps", "1", *shown, "--out", tmp_path / "run"))
    assert re.search(r"final evaluation: .*\d+/\d+ \[", result.stderr), result.stderr
    quiet = train_pixel_run(tmp_path / "quiet", steps=1, limit=8)
    assert "final evaluation" not in quiet.stderr


def test_sampling_progress_counts_every_position(prior_pipeline, capsys):
    top, bottom = load_model(prior_pipeline.top), load_model(prior_pipeline.bottom)
    generate(top, 3, bottom=bottom, batch_size=2, label=1, progress=True)
    positions = 2 * (4 * 4 + 8 * 8)  # two batches (2 + 1 samples), each over a 4x4 top and an 8x8 bottom map
    assert re.search(rf"sample: .*\b{positions}/{positions} \[", capsys.readouterr().err)
    generate(top, 3, bottom=bottom, label=1, progress=False)
    assert capsys.readouterr().err == ""


def test_prior_completion_shows_the_re_encoded_prefix(prior_pipeline, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    keep_rows = 10  # top codes (4 image rows each) keep 2 rows = 8 image rows; bottom codes (2 rows each) 5 rows
    check_ok(run_cli("complete", prior_pipeline.top, "--bottom", prior_pipeline.bottom, "--image", tmp_path / "in.png",
                     "--keep-rows", keep_rows, "--num", "2", "--class", "1", "--out", tmp_path / "out.png",
                     "--device", "cpu", "--quiet"))
    with Image.open(tmp_path / "out.png") as im:
        grid = np.asarray(im)
    panel = lambda i: grid[2:18, 2 + i * 18:18 + i * 18]  # noqa: E731 - make_grid: padding 2, 16x16 images
    vq = load_model(prior_pipeline.top).vqvae
    image = load_image(tmp_path / "in.png", 3, (16, 16))
    decoded = vq.decode(vq.encode(image.unsqueeze(0)))[0].permute(1, 2, 0).numpy()
    original, masked = panel(0), panel(1)
    assert np.array_equal(original, image.permute(1, 2, 0).numpy())
    assert np.array_equal(masked[:8], decoded[:8])  # what the prior conditions on
    assert (masked[8:] == 128).all()
    assert not np.array_equal(masked[:8], original[:8])  # the lossy reconstruction, not the pixels
    # The completions' kept rows look like the conditioned view (up to the decoder reaching across the boundary
    # into sampled codes), not like the original pixels.
    gap = lambda a, b: np.abs(a[:8].astype(int) - b[:8].astype(int)).mean()  # noqa: E731
    for i in (2, 3):
        assert gap(panel(i), masked) * 4 < gap(panel(i), original)
