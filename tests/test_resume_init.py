"""Resuming and fine-tuning: ``--resume`` refuses options that would change the run (naming them) and applies and
echoes the others; an exported checkpoint cannot be resumed (one line, before any data is loaded); ``--init-from``
starts a new run from any checkpoint's weights (exports and the shipped files included) with its architecture, a
fresh optimizer and step 0, and refuses data the checkpoint cannot model."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_support import check_ok, run_cli, train_pixel_run
from vqprior.checkpoint import read_checkpoint
from vqprior.config import ModelConfig

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"
FAST = ["--steps", "1", "--lr", "1e-12", "--eval-limit", "4", "--num-samples", "1", "--batch-size", "4", "--quiet",
        "--device", "cpu"]  # one step at a learning rate that leaves the weights where they started


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def error_line(result) -> str:
    assert isinstance(result.exception, SystemExit) and result.exit_code not in (0, None), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def same_weights(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


# --- --resume ---------------------------------------------------------------------------------------------------

def test_resume_refuses_changed_architecture_and_data_naming_them(pixel_run, tmp_path):
    run = copy_run(pixel_run.folder, tmp_path)
    before = (run / "latest.pt").read_bytes()
    # mnist without --data-dir would fail as soon as data were loaded: the refusal comes first.
    line = error_line(run_cli("train-pixels", "--out", run, "--resume", "--filters", "64", "--dataset", "mnist",
                              "--no-attention", "--quiet"))
    for named in ("--filters 64 (was 16)", "--dataset mnist (was sample)", "--no-attention (was on)", "resumed run"):
        assert named in line, line
    assert (run / "latest.pt").read_bytes() == before


@pytest.mark.parametrize("args,named", [
    (["--preset", "small"], "--preset small"),
    (["--image-size", "16"], "--image-size 16 (was 8)"),
    (["--limit", "8"], "--limit 8 (was 16)"),
    (["--class-conditional"], "--class-conditional (was off)"),
    (["--data-dir", "elsewhere"], "--data-dir elsewhere"),
])
def test_resume_refuses_each_fixed_option(pixel_run, tmp_path, args, named):
    run = copy_run(pixel_run.folder, tmp_path)
    assert named in error_line(run_cli("train-pixels", "--out", run, "--resume", *args, "--quiet"))


def test_resume_with_the_same_command_line_applies_and_echoes_the_changeable_options(pixel_run, tmp_path):
    run = copy_run(pixel_run.folder, tmp_path)
    # The original command line (fixed options unchanged) plus new steps and intervals: accepted.
    n, more = pixel_run.steps, pixel_run.steps + 2
    result = train_pixel_run(run, "--resume", "--eval-every", "3", "--checkpoint-every", "3", "--cooldown-steps", "2",
                             steps=more, limit=pixel_run.limit)
    echoed = re.search(rf"Resuming .* from step {n} with: (.*)\.\n", result.stderr)
    assert echoed, result.stderr
    applied = echoed.group(1).split(", ")
    for option in (f"--steps {more}", "--eval-every 3", "--checkpoint-every 3", "--cooldown-steps 2", "--quiet",
                   "--device cpu"):
        assert option in applied
    assert not any(a.startswith(("--preset", "--dataset", "--image-size", "--limit")) for a in applied)
    data = read_checkpoint(run / "latest.pt")
    assert data["step"] == more
    assert data["config"]["train"]["eval_every"] == 3 and data["config"]["train"]["checkpoint_every"] == 3
    assert data["config"]["train"]["cooldown_steps"] == 2


def test_resume_without_options_says_so(pixel_run, tmp_path):
    run = copy_run(pixel_run.folder, tmp_path)
    n = pixel_run.steps
    result = check_ok(run_cli("train-pixels", "--out", run, "--resume", "--steps", n, "--quiet"))
    assert re.search(rf"Resuming .* from step {n} with: --steps {n}, --quiet\.", result.stderr), result.stderr


def test_resume_echoes_threads_among_the_applied_options(pixel_run, tmp_path):
    # --threads is added to every command by cli.py without a keyword argument; resuming with it is applied and said.
    run = copy_run(pixel_run.folder, tmp_path)
    n = pixel_run.steps
    result = check_ok(run_cli("train-pixels", "--out", run, "--resume", "--steps", n, "--threads", "1", "--quiet"))
    assert re.search(rf"Resuming .* from step {n} with: .*--threads 1", result.stderr), result.stderr


def test_resume_of_an_exported_checkpoint_is_one_line_before_loading_data(pixel_run, tmp_path):
    run = tmp_path / "exported"
    run.mkdir()
    check_ok(run_cli("export", pixel_run.checkpoint, "--out", run / "latest.pt"))
    # cifar10 without --data-dir would fail on loading data: the export is refused first.
    line = error_line(run_cli("train-pixels", "--out", run, "--resume", "--dataset", "cifar10", "--quiet"))
    assert "exported checkpoint" in line and "--init-from" in line, line


def test_resume_of_a_prior_refuses_other_codes_level_and_vqvae(prior_pipeline, tmp_path):
    shutil.copytree(prior_pipeline.top.parent, tmp_path / "top")
    run = tmp_path / "top"
    line = error_line(run_cli("train-prior", "--codes", prior_pipeline.test_codes, "--out", run, "--resume",
                              "--level", "bottom", "--vqvae", prior_pipeline.top, "--embed-dim", "99", "--quiet"))
    for named in ("--codes", "--level bottom (was top)", "--vqvae", "--embed-dim 99 (was 8)"):
        assert named in line, line
    more = prior_pipeline.steps + 1
    ok = check_ok(run_cli("train-prior", "--codes", prior_pipeline.train_codes, "--val-codes",
                          prior_pipeline.test_codes, "--out", run, "--resume", "--vqvae", prior_pipeline.vqvae,
                          "--steps", more, "--quiet", "--device", "cpu"))
    assert "with: --val-codes" in ok.stderr and f"--steps {more}" in ok.stderr


def test_resume_of_a_vqvae_refuses_architecture(prior_pipeline, tmp_path):
    shutil.copytree(prior_pipeline.vqvae.parent, tmp_path / "vq")
    line = error_line(run_cli("train-vqvae", "--out", tmp_path / "vq", "--resume", "--codebook-size", "8",
                              "--levels", "1", "--quiet"))
    assert "--codebook-size 8 (was 16)" in line and "--levels 1 (was 2)" in line, line


# --- --init-from ------------------------------------------------------------------------------------------------

def test_init_from_starts_a_new_run_from_the_weights(pixel_run, tmp_path):
    source = read_checkpoint(pixel_run.checkpoint)
    # --preset is left at its default (small): the architecture is the checkpoint's (tiny), not the preset's.
    result = check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "8",
                              "--init-from", pixel_run.checkpoint, *FAST, "--out", tmp_path / "ft"))
    assert "Starting from the weights of" in result.stderr and "step 0" in result.stderr
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert data["step"] == 1
    assert data["config"]["model"] == source["config"]["model"]
    assert same_weights(data["model"], source["ema"])  # EMA weights, not the data-dependent init
    assert all(s["step"] == 1 for s in data["optimizer"]["state"].values())  # a fresh optimizer
    assert [line for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]  # a new metrics log


def test_init_from_an_exported_checkpoint(pixel_run, tmp_path):
    check_ok(run_cli("export", pixel_run.checkpoint, "--out", tmp_path / "small.pt"))
    check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "8",
                     "--init-from", tmp_path / "small.pt", *FAST, "--out", tmp_path / "ft"))
    exported = read_checkpoint(tmp_path / "small.pt")
    assert same_weights(read_checkpoint(tmp_path / "ft" / "latest.pt")["model"], exported["model"])


def test_init_from_the_shipped_pixel_model(tmp_path):
    shipped = SHIPPED / "cifar10-pixels-small.pt"
    check_ok(run_cli("train-pixels", "--dataset", "sample", "--limit", "4", "--init-from", shipped, *FAST,
                     "--eval-limit", "2", "--batch-size", "2", "--out", tmp_path / "ft"))
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert data["step"] == 1 and same_weights(data["model"], read_checkpoint(shipped)["model"])


def test_init_from_the_shipped_top_prior_on_new_codes(tmp_path):
    check_ok(run_cli("extract-codes", "--vqvae", SHIPPED / "cifar10-vqvae.pt", "--dataset", "sample", "--limit", "8",
                     "--out", tmp_path / "codes.lmdb", "--quiet", "--device", "cpu"))
    shipped = SHIPPED / "cifar10-prior-top.pt"
    check_ok(run_cli("train-prior", "--codes", tmp_path / "codes.lmdb", "--init-from", shipped, *FAST,
                     "--out", tmp_path / "ft"))
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert data["step"] == 1 and same_weights(data["model"], read_checkpoint(shipped)["model"])
    # (fields added since the shipped file was written, e.g. null_class, read back at their defaults)
    assert ModelConfig.from_dict(data["config"]["model"]) == ModelConfig.from_dict(
        read_checkpoint(shipped)["config"]["model"])


def test_init_from_a_bottom_prior_keeps_its_level(prior_pipeline, tmp_path):
    check_ok(run_cli("train-prior", "--codes", prior_pipeline.train_codes, "--init-from", prior_pipeline.bottom, *FAST,
                     "--out", tmp_path / "ft"))
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert data["config"]["prior"]["level"] == "bottom"
    assert same_weights(data["model"], read_checkpoint(prior_pipeline.bottom)["ema"])


def test_init_from_a_vqvae(prior_pipeline, tmp_path):
    check_ok(run_cli("train-vqvae", "--dataset", "sample", "--image-size", "16", "--limit", "8",
                     "--init-from", prior_pipeline.vqvae, *FAST, "--out", tmp_path / "ft"))
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    source = read_checkpoint(prior_pipeline.vqvae)
    assert data["step"] == 1 and data["config"]["model"] == source["config"]["model"]
    # The codebooks move by their own EMA update (not the learning rate); everything else starts where it was.
    assert same_weights({k: v for k, v in data["model"].items() if not k.startswith("quantizers.")},
                        {k: v for k, v in source["ema"].items() if not k.startswith("quantizers.")})
    assert torch.allclose(data["model"]["quantizers.0.embedding"], source["ema"]["quantizers.0.embedding"], atol=0.1)


@pytest.mark.parametrize("command,source,args,word", [
    ("train-pixels", "px", "--image-size 8 --filters 32 --preset small", r"--filters 32 \(was 16\); --preset small"),
    ("train-pixels", "px", "--image-size 16", "models 3x8x8 images, but the data are 3x16x16"),
    ("train-pixels", "px", "--image-size 8 --resume", "pass only one"),
    ("train-pixels", "vq", "--image-size 8", "vqvae checkpoint"),
    ("train-prior", "bottom", "--codes {train_codes} --level top", r"--level top \(was bottom\)"),
    ("train-vqvae", "vq", "--image-size 16 --codebook-size 8", r"--codebook-size 8 \(was 16\)"),
])
def test_init_from_refusals(pixel_run, prior_pipeline, tmp_path, command, source, args, word):
    sources = {"px": pixel_run.checkpoint, "bottom": prior_pipeline.bottom, "vq": prior_pipeline.vqvae}
    args = args.format(train_codes=prior_pipeline.train_codes).split()
    result = run_cli(command, *args, "--init-from", sources[source], *FAST, "--out", tmp_path / "ft")
    assert re.search(word, error_line(result)), error_line(result)
    assert not (tmp_path / "ft").exists()


def test_init_from_a_class_conditional_model_needs_labelled_data(conditional_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    line = error_line(run_cli("train-pixels", "--dataset", "folder", "--data-dir", folder, "--init-from",
                              conditional_run.checkpoint, *FAST, "--out", tmp_path / "ft"))
    assert "class-conditional over 10 classes, but the data have no class labels" in line, line
    # The same checkpoint on labelled data: conditioning follows the checkpoint without --class-conditional.
    check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "8", "--init-from",
                     conditional_run.checkpoint, *FAST, "--out", tmp_path / "ok"))
    assert read_checkpoint(tmp_path / "ok" / "latest.pt")["config"]["data"]["class_conditional"] is True
