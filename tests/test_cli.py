"""End-to-end tests of the ``vqprior`` CLI with click's CliRunner on tiny configs: exit codes, the files each
command writes and what is in them. The expensive artefacts (a pixel run; a VQ-VAE with code caches and priors)
are the session's shared ones (conftest.py); tests that change a run work on a copy.
"""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vqprior
from cli_support import check_ok, run_cli, train_pixel_run
from vqprior.checkpoint import read_checkpoint
from vqprior.commands.cli import cli
from vqprior.data.codes import read_code_metadata
from vqprior.images import make_grid


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def png_array(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def grid_of(images):
    """The (H, W, 3) PNG content save_grid writes for uint8 (N, C, H, W) images."""
    return make_grid(torch.as_tensor(images)).permute(1, 2, 0).numpy()


def gif_frames(path):
    with Image.open(path) as im:
        assert im.format == "GIF"
        return im.n_frames, im.size


# --- help ---------------------------------------------------------------------------------------------------------

def test_group_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom vqprior.commands.cli import cli\n"
            "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'vqprior --help imported torch'\nprint(r.output)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in cli.commands:
        assert name in proc.stdout


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name):
    result = check_ok(run_cli(name, "--help"))
    first = result.output.splitlines()[0]
    assert first.startswith("Usage:") and f" {name} " in f"{first} "
    assert "--help" in result.output


def test_version():
    assert vqprior.__version__ in check_ok(run_cli("--version")).output


# --- pixel models -------------------------------------------------------------------------------------------------

def test_train_pixels_writes_grid_metrics_and_checkpoint(pixel_run):
    run, n = pixel_run.folder, pixel_run.steps
    assert re.search(rf"step {n}: held-out [\d.]+ bits/dim", pixel_run.result.output)
    grid = png_array(run / f"samples_step{n}.png")
    assert grid.shape == grid_of(np.zeros((4, 3, 8, 8), np.uint8)).shape  # --num-samples 4 images of 8x8
    records = read_metrics(run)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [n] and [r["step"] for r in evals] == [n]
    assert np.isfinite(evals[0]["bpd"]) and evals[0]["bpd"] > 0
    data = read_checkpoint(run / "latest.pt")
    assert data["kind"] == "pixels" and data["step"] == n
    model = vqprior.load_model(run / "latest.pt")
    assert (model.config.channels, model.config.height, model.config.width) == (3, 8, 8)
    assert not model.training
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))


def test_resume_continues_from_the_saved_step(pixel_run, tmp_path):
    run, n = tmp_path / "run", pixel_run.steps
    shutil.copytree(pixel_run.folder, run)
    result = train_pixel_run(run, "--resume", steps=n + 2, limit=pixel_run.limit)
    assert "Resuming" in result.output and f"from step {n}" in result.output
    assert f"step {n + 2}:" in result.output
    assert read_checkpoint(run / "latest.pt")["step"] == n + 2
    records = read_metrics(run)
    assert [(r["split"], r["step"]) for r in records] == [("train", n), ("eval", n), ("train", n + 2),
                                                           ("eval", n + 2)]
    assert (run / f"samples_step{n + 2}.png").exists()


def test_evaluate_matches_the_trainers_held_out_score(pixel_run):
    result = check_ok(run_cli("evaluate", pixel_run.checkpoint, "--limit", "16", "--quiet", "--device", "cpu"))
    match = re.search(r"([\d.]+) bits/dim on sample test: (\d+) items", result.output)
    assert match, result.output
    assert int(match.group(2)) == 16
    # The trainer evaluated the same EMA weights on the same first 16 held-out images (--eval-limit 16).
    trained_bpd = [r for r in read_metrics(pixel_run.folder) if r["split"] == "eval"][-1]["bpd"]
    assert float(match.group(1)) == pytest.approx(trained_bpd, abs=2e-4)


def test_sample_writes_grid_array_and_animation(pixel_run, tmp_path):
    ckpt = pixel_run.checkpoint
    out, array, gif = tmp_path / "s.png", tmp_path / "s.npy", tmp_path / "s.gif"
    result = check_ok(run_cli("sample", ckpt, "--num", "3", "--seed", "1", "--out", out, "--save-array", array,
                              "--animate", gif, "--device", "cpu"))
    assert "wrote 3 samples" in result.output
    images = np.load(array)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(png_array(out), grid_of(images))  # the grid shows exactly the saved array
    frames, size = gif_frames(gif)
    assert frames >= 2 and size == (png_array(out).shape[1], png_array(out).shape[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gif", "s.npy", "s.png"]


def test_naive_and_cached_sampling_agree_for_the_same_seed(pixel_run, tmp_path):
    ckpt = pixel_run.checkpoint
    arrays = {}
    for method, seed in (("cached", 3), ("naive", 3), ("cached", 4)):
        path = tmp_path / f"{method}{seed}.npy"
        check_ok(run_cli("sample", ckpt, "--num", "2", "--seed", seed, "--method", method, "--out",
                         tmp_path / f"{method}{seed}.png", "--save-array", path, "--device", "cpu"))
        arrays[method, seed] = np.load(path)
    np.testing.assert_array_equal(arrays["cached", 3], arrays["naive", 3])
    assert not np.array_equal(arrays["cached", 3], arrays["cached", 4])  # the seed matters, so equality means something


# The naive sampler runs the network's convolutions; the cached one its per-position matrix products.
@pytest.mark.parametrize("method,module,op", [("cached", torch, "addmm"), ("naive", torch.nn.functional, "conv2d")])
def test_bf16_sampling_runs_the_network_in_bfloat16(pixel_run, tmp_path, monkeypatch, method, module, op):
    ckpt = pixel_run.checkpoint
    real, dtypes = getattr(module, op), {}

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        dtypes.setdefault(precision, set()).add(out.dtype)
        return out

    monkeypatch.setattr(module, op, spy)
    arrays = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.npy"
        check_ok(run_cli("sample", ckpt, "--num", "2", "--seed", "5", "--method", method, "--precision", precision,
                         "--out", tmp_path / f"{precision}.png", "--save-array", path, "--device", "cpu"))
        arrays[precision] = np.load(path)
        assert arrays[precision].shape == (2, 3, 8, 8) and arrays[precision].dtype == np.uint8
    assert dtypes["fp32"] == {torch.float32}
    assert torch.bfloat16 in dtypes["bf16"]  # autocast reached the network's heavy ops


def test_class_conditional_training_and_sampling_a_class(conditional_run, tmp_path):
    ckpt = conditional_run.checkpoint
    assert read_checkpoint(ckpt)["config"]["model"]["num_classes"] == 10  # the sample data is CIFAR-10
    check_ok(run_cli("sample", ckpt, "--num", "2", "--class", "3", "--out", tmp_path / "c3.png",
                     "--save-array", tmp_path / "c3.npy", "--device", "cpu"))
    assert np.load(tmp_path / "c3.npy").shape == (2, 3, 8, 8)
    check_ok(run_cli("sample", ckpt, "--num", "2", "--out", tmp_path / "cycle.png", "--device", "cpu"))
    assert (tmp_path / "c3.png").exists() and (tmp_path / "cycle.png").exists()


# --- VQ-VAE and code priors ---------------------------------------------------------------------------------------

def test_vqvae_and_code_caches(prior_pipeline):
    vq = read_checkpoint(prior_pipeline.vqvae)
    assert vq["kind"] == "vqvae" and vq["config"]["model"]["levels"] == 2
    assert list(prior_pipeline.vqvae.parent.glob("samples_step*.png"))
    assert "top 4x4 + bottom 8x8, 16 codes" in prior_pipeline.results["extract-train"].output
    for path, count in ((prior_pipeline.train_codes, prior_pipeline.train_items),
                        (prior_pipeline.test_codes, prior_pipeline.test_items)):
        meta = read_code_metadata(path)
        assert meta["count"] == count and meta["level_names"] == ["top", "bottom"]
        assert meta["shapes"] == [[4, 4], [8, 8]] and meta["codebook_sizes"] == [16, 16]


def test_priors_are_trained_per_level(prior_pipeline):
    for path, level, size, classes in ((prior_pipeline.top, "top", 4, 10), (prior_pipeline.bottom, "bottom", 8, 0)):
        data = read_checkpoint(path)
        assert data["kind"] == "prior" and data["config"]["prior"]["level"] == level
        assert data["config"]["model"]["num_classes"] == classes
        model = vqprior.load_model(path)
        assert (model.config.height, model.config.width, model.config.num_codes) == (size, size, 16)
        assert model.vqvae.config.levels == 2  # the VQ-VAE travels inside the prior
        evals = [r for r in read_metrics(path.parent) if r["split"] == "eval"]
        assert evals and np.isfinite(evals[-1]["bits_per_code"])


def test_sample_priors_then_decode_the_saved_codes(prior_pipeline, tmp_path):
    out, codes, gif = tmp_path / "s.png", tmp_path / "c.npz", tmp_path / "a.gif"
    check_ok(run_cli("sample", prior_pipeline.top, "--bottom", prior_pipeline.bottom, "--num", "2", "--class", "1",
                     "--out", out, "--save-codes", codes, "--animate", gif, "--device", "cpu"))
    sampled = png_array(out)
    assert sampled.shape == grid_of(np.zeros((2, 3, 16, 16), np.uint8)).shape
    with np.load(codes) as data:
        assert sorted(data.files) == ["bottom", "top"]
        top, bottom = data["top"], data["bottom"]
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8) and top.dtype == np.int64
    assert 0 <= top.min() and max(top.max(), bottom.max()) < 16
    assert gif_frames(gif)[0] >= 2
    # Decoding the saved codes, with the VQ-VAE checkpoint or with the prior that embeds it, redraws the samples.
    for source in (prior_pipeline.vqvae, prior_pipeline.top):
        decoded = tmp_path / f"d_{source.parent.name}.png"
        assert "decoded 2 code maps" in check_ok(run_cli("decode", "--vqvae", source, codes, "--out", decoded,
                                                         "--device", "cpu")).output
        np.testing.assert_array_equal(png_array(decoded), sampled)


def test_evaluate_marginal_scores_a_class_conditional_model_as_unconditional(conditional_run):
    ckpt = conditional_run.checkpoint
    pattern = r"([\d.]+) bits/dim on sample test(.*): 16 items"
    cond = re.search(pattern, check_ok(run_cli("evaluate", ckpt, "--limit", "16", "--quiet", "--device", "cpu")).output)
    marg = re.search(pattern, check_ok(run_cli("evaluate", ckpt, "--limit", "16", "--marginal", "--quiet",
                                               "--device", "cpu")).output)
    assert cond and marg and cond.group(2) == "" and "marginal over 10 classes" in marg.group(2)
    # -log2 p(x) <= -log2 p(x|y) + log2(10) per image: the bound spread over 3 x 8 x 8 values
    assert float(marg.group(1)) <= float(cond.group(1)) + math.log2(10) / (3 * 8 * 8) + 1e-4
    assert float(marg.group(1)) != float(cond.group(1))


def test_evaluate_priors_on_code_caches(prior_pipeline):
    result = check_ok(run_cli("evaluate", prior_pipeline.bottom, "--codes", prior_pipeline.test_codes, "--quiet",
                              "--device", "cpu"))
    match = re.search(r"([\d.]+) bits/code on .*\(bottom codes\): (\d+) items", result.output)
    assert match and int(match.group(2)) == prior_pipeline.test_items
    assert 0 < float(match.group(1)) < 8  # a trained 16-code prior beats nothing: at most log2(16)=4 plus slack
    limited = check_ok(run_cli("evaluate", prior_pipeline.top, "--codes", prior_pipeline.test_codes, "--limit", "8",
                               "--quiet", "--device", "cpu"))
    assert re.search(r"bits/code on .*\(top codes\): 8 items", limited.output)


# --- receptive field ----------------------------------------------------------------------------------------------

def test_receptive_field_compare_shows_blind_spots_without_attention(tmp_path):
    single, both = tmp_path / "one.png", tmp_path / "two.png"
    check_ok(run_cli("receptive-field", "--preset", "tiny", "--size", "8", "--out", single))
    result = check_ok(run_cli("receptive-field", "--preset", "tiny", "--size", "8", "--compare", "--out", both))
    blind = [int(n) for n in re.findall(r"\((\d+) blind\)", result.output)]
    assert len(blind) == 2 and blind[0] == 0 and blind[1] > 0  # attention reaches every earlier position
    assert png_array(both).shape[1] > png_array(single).shape[1]  # two panels side by side


def test_export_writes_a_smaller_checkpoint_that_scores_the_same(pixel_run, tmp_path):
    ckpt, small = pixel_run.checkpoint, tmp_path / "small.pt"
    result = check_ok(run_cli("export", ckpt, "--out", small))
    assert "fp16 weights" in result.output
    data = torch.load(small, map_location="cpu", weights_only=True)
    assert data["storage_dtype"] == "float16" and "optimizer" not in data and "ema" not in data
    assert {v.dtype for v in data["model"].values() if v.is_floating_point()} == {torch.float16}
    assert small.stat().st_size < ckpt.stat().st_size / 2
    scores = []
    for path in (ckpt, small):
        out = check_ok(run_cli("evaluate", path, "--limit", "16", "--quiet", "--device", "cpu")).output
        scores.append(float(re.search(r"([0-9.]+) bits/dim", out).group(1)))
    assert abs(scores[0] - scores[1]) < 0.01 and scores[0] != 0  # fp16 storage of the EMA weights, same model
