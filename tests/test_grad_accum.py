"""Gradient accumulation: N micro-batches of B train to the weights of one batch of N*B (dropout off, the same
start), in float64 and under fp16's loss scaling; resume stays exact; the metrics and `info` record the effective
batch; a torchrun run accumulates too (tests/test_distributed.py)."""
import json

import pytest
import torch

from conftest import ImageSet, tiny_pixel_task, tiny_train_config
from vqprior.checkpoint import read_checkpoint
from vqprior.training.loop import train


def _start():
    """Weights every run starts from (so that the data-dependent init, made on one micro-batch, is shared)."""
    torch.manual_seed(0)
    return tiny_pixel_task(dropout=0.0).build_model().state_dict()


def _train(out, batch, accum, steps=3, dtype=torch.float64, **kw):
    task = tiny_pixel_task(dropout=0.0)
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    try:
        config = tiny_train_config(steps, batch_size=batch, grad_accum=accum, checkpoint_every=1000, **kw)
        train(task, ImageSet(), ImageSet(8, seed=1), config, out, init_weights=_start(), progress=False)
    finally:
        torch.set_default_dtype(torch.float32)
    return read_checkpoint(out / "latest.pt")


def _max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_train_to_the_weights_of_the_whole_batch(tmp_path, accum):
    whole = _train(tmp_path / "whole", 8, 1)
    micro = _train(tmp_path / "micro", 8 // accum, accum)
    moved = _max_difference(whole["model"], _start())
    assert moved > 1e-3  # training moved the weights
    assert _max_difference(whole["model"], micro["model"]) < 1e-9 * max(1.0, moved)
    assert _max_difference(whole["ema"], micro["ema"]) < 1e-9 * max(1.0, moved)
    # Not the same as fewer images: one micro-batch alone trains to other weights.
    alone = _train(tmp_path / "alone", 8 // accum, 1)
    assert _max_difference(whole["model"], alone["model"]) > 1e-4


def test_accumulation_resumes_exactly_and_records_the_effective_batch(tmp_path):
    full = _train(tmp_path / "full", 2, 3, steps=4, dtype=torch.float32)
    _train(tmp_path / "part", 2, 3, steps=2, dtype=torch.float32)
    task = tiny_pixel_task(dropout=0.0)
    config = tiny_train_config(4, batch_size=2, grad_accum=3, checkpoint_every=1000)
    train(task, ImageSet(), ImageSet(8, seed=1), config, tmp_path / "part",
          checkpoint=read_checkpoint(tmp_path / "part" / "latest.pt"), progress=False)
    part = read_checkpoint(tmp_path / "part" / "latest.pt")
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    assert full["config"]["train"]["grad_accum"] == 3
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {r["effective_batch"] for r in records if r["split"] == "train"} == {6}


def test_loss_scaling_accumulates_the_unscaled_gradient():
    """fp16 training scales each micro-batch's loss by the same factor and unscales the summed gradient once: the
    gradient equals the whole batch's (float32, the scale at 2**16)."""
    from types import SimpleNamespace

    from vqprior.training.acceleration import accumulate_gradients

    task = tiny_pixel_task(dropout=0.0)
    model = task.build_model()
    model.load_state_dict(_start())
    batch = {k: torch.stack([ImageSet()[i][k] for i in range(8)]) for k in ("image", "label", "index")}
    grads = []
    for accum in (1, 4):
        model.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        accumulate_gradients(task, model, batch, SimpleNamespace(grad_accum=accum, precision="fp32"), scaler)
        scaler.unscale_(opt)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_inner_micro_batches_skip_the_all_reduce():
    """Under DistributedDataParallel the first N-1 micro-batches run inside ``no_sync()`` (no gradient all-reduce),
    the last one outside it."""
    import contextlib
    from types import SimpleNamespace

    from vqprior.training.acceleration import accumulate_gradients

    calls = []

    class Task:
        def loss(self, model, part):
            calls.append(("loss", ddp.syncing))
            return (model * part["x"]).sum(), {}

    class FakeDDP:
        syncing = True

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            yield
            self.syncing = True

    ddp = FakeDDP()
    model = torch.ones((), requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulate_gradients(Task(), model, {"x": torch.arange(6.0)}, SimpleNamespace(grad_accum=3, precision="fp32"),
                         scaler, ddp)
    assert calls == [("loss", False), ("loss", False), ("loss", True)]
    assert model.grad.item() == pytest.approx(15.0 / 3)


def test_torchrun_with_accumulation_trains_as_one_process(tmp_path):
    """2 ranks x micro-batches of 2 x 2 micro-batches per step equal one process with micro-batches of 4."""
    import os
    import subprocess
    import sys

    from cli_support import check_ok, run_cli

    common = ["train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "32", "--steps", "2",
              "--preset", "tiny", "--dropout", "0", "--batch-size", "4", "--grad-accum", "2", "--eval-limit", "8",
              "--num-samples", "2", "--quiet", "--device", "cpu"]
    check_ok(run_cli(*common, "--out", tmp_path / "one"))
    info = json.loads(check_ok(run_cli("info", tmp_path / "one" / "latest.pt", "--json")).stdout)
    assert info["training"]["grad_accum"] == 2 and info["training"]["effective_batch"] == 8
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vqprior.commands.cli", *common, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = read_checkpoint(tmp_path / "one" / "latest.pt")["model"]
    two = read_checkpoint(tmp_path / "two" / "latest.pt")["model"]
    for name, weight in one.items():  # the tolerance of tests/test_distributed.py (Adam on near-zero gradients)
        torch.testing.assert_close(two[name], weight, atol=2e-4, rtol=1e-4, msg=name)
