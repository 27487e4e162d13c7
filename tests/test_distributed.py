"""Distributed training: 2 CPU processes under torchrun (gloo) train the model one process trains with the same
global batch, with eval reduced across ranks and a checkpoint that single-process commands load."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.checkpoint import load_model, read_checkpoint
from vqprior.training.run_state import StepBatchSampler

# Dropout 0: the two runs must compute the same function of the same data (dropout masks differ per process).
TRAIN = ["train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "64", "--steps", "3",
         "--preset", "tiny", "--dropout", "0", "--batch-size", "8", "--eval-limit", "16", "--num-samples", "4",
         "--quiet", "--device", "cpu"]
TIMEOUT_S = 900  # a safety net against a hung process group on a loaded machine, not a pace


def test_rank_slices_partition_each_global_batch():
    one = StepBatchSampler(50, 8, seed=3, start_step=0, steps=10)
    ranks = [list(StepBatchSampler(50, 8, seed=3, start_step=0, steps=10, rank=r, world_size=2)) for r in range(2)]
    for step, batch in enumerate(one):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
        assert len(ranks[0][step]) == len(ranks[1][step]) == 4


def test_two_processes_train_the_same_model_as_one(tmp_path):
    check_ok(run_cli(*TRAIN, "--out", tmp_path / "one"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        # --standalone: the rendezvous store binds a free port itself (a port picked here could be taken meanwhile)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vqprior.commands.cli", *TRAIN, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 alone prints: one summary line and one model description, not two.
    assert proc.stdout.count("step 3:") == 1, proc.stdout
    assert proc.stderr.count("PixelSNAIL") == 1, proc.stderr[-3000:]

    one = read_checkpoint(tmp_path / "one" / "latest.pt", "pixels")
    two = read_checkpoint(tmp_path / "two" / "latest.pt", "pixels")
    assert one["step"] == two["step"] == 3
    # Adam divides by the root of the squared gradients, so parameters whose gradient is zero up to rounding (the
    # key bias of attention: softmax ignores it) move by rounding noise; the tolerance is a fraction of the lr.
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, atol=2e-4, rtol=1e-4, msg=name)
    # Typical parameters agree much more tightly than one Adam step (lr 1e-3) of a different gradient would allow.
    diffs = torch.cat([(two["model"][k] - w).abs().flatten() for k, w in one["model"].items()])
    assert float(diffs.mean()) < 2e-6, float(diffs.mean())
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    log_probs = [load_model(tmp_path / run / "latest.pt", "cpu").log_prob(images) for run in ("one", "two")]
    torch.testing.assert_close(log_probs[1], log_probs[0], rtol=1e-4, atol=1e-3)
    # The eval of the 2-process run is reduced over the two ranks' shards of the held-out set.
    assert two["metrics"]["eval_bpd"] == pytest.approx(one["metrics"]["eval_bpd"], rel=1e-5)
    assert (tmp_path / "two" / "samples_step3.png").is_file()


def test_global_batch_must_split_evenly_across_processes(tmp_path, monkeypatch):
    import vqprior.training.distributed as distributed

    monkeypatch.setattr(distributed, "get_world_size", lambda: 3)
    result = run_cli(*TRAIN, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "divisible by the 3 processes" in result.output
