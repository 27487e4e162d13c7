"""Multi-process behaviour that a GPU cluster depends on, checked with 2 CPU processes over gloo: a non-finite
encoder output on one rank must not leave the other waiting in an all-reduce (NCCL would hang
there), every rank keeps the same codebook without DDP re-broadcasting buffers, and the process group gets its
timeout and GPU binding. The ranks run tests/dist_worker.py; a timeout turns a hang into a failure."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 600  # a safety net against a hung process group on a loaded machine, not a pace


def run_ranks(tmp_path: Path, mode: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(tmp_path / "store"), str(tmp_path),
                               mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a collective is waiting for a rank that "
                    f"left it)")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_encoder_output_on_one_rank_skips_the_codebook_update_on_all(tmp_path):
    ranks = run_ranks(tmp_path, "quantizer")
    history = [r["history"] for r in ranks]
    for step in range(4):
        assert states_equal(history[0][step], history[1][step]), step  # the same codebook on both ranks
    assert states_equal(history[0][1], history[0][0])  # the step with rank 1's NaN changed nothing, anywhere
    assert not states_equal(history[0][2], history[0][1])  # the next batch updates again
    assert all(torch.isfinite(t).all() for t in history[0][3].values())


def test_training_with_a_non_finite_batch_on_one_rank_finishes_with_identical_ranks(tmp_path):
    ranks = run_ranks(tmp_path, "train")
    for r in ranks:
        assert (r["status"], r["step"], r["skipped"]) == ("finished", 4, 1)
        assert r["broadcast_buffers"] is False  # codebooks are synchronised by the quantizer itself
    assert states_equal(ranks[0]["state"], ranks[1]["state"])  # weights and codebook buffers alike
    assert all(torch.isfinite(t).all() for t in ranks[0]["state"].values())


def test_the_process_group_gets_a_timeout_and_its_gpu(monkeypatch):
    """Under torchrun on CUDA (torch.cuda and the group's creation replaced by recorders)."""
    import torch.distributed as dist

    from vqprior.training import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init_process_group(backend, rank=-1, world_size=-1, timeout=None, device_id=None):  # torch >= 2.3
        calls.append(((backend,), {"timeout": timeout, **({"device_id": device_id} if device_id else {})}))

    def older_init_process_group(backend, rank=-1, world_size=-1, timeout=None):  # no device_id: never passed
        calls.append(((backend,), {"timeout": timeout}))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "atexit", type("NoAtexit", (), {"register": staticmethod(lambda f: None)}))
    rank, world, device = distributed.init_distributed("cuda", timeout_minutes=7)
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
    (args, kwargs), = calls
    assert args == ("nccl",) and kwargs["timeout"] == timedelta(minutes=7)
    assert kwargs["device_id"] == torch.device("cuda", 1)
    calls.clear()
    monkeypatch.setattr(dist, "init_process_group", older_init_process_group)
    distributed.init_distributed("cuda")
    assert calls[0][1] == {"timeout": timedelta(minutes=distributed.DEFAULT_TIMEOUT_MINUTES)}
    calls.clear()
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    distributed.init_distributed("cpu")
    (args, kwargs), = calls
    assert args == ("gloo",) and "device_id" not in kwargs
    assert kwargs["timeout"] == timedelta(minutes=distributed.DEFAULT_TIMEOUT_MINUTES)


def test_ranks_start_the_same_ema_and_agree_on_the_flags_after_the_backward_pass(tmp_path):
    """Each rank's init may differ in the last bits on a GPU; DDP broadcasts rank 0's weights, and the EMA must be
    built from those, not from the rank's own init. The flags' all-reduce, the step's one read, comes after the
    backward pass is queued (gradients present), not between forward and backward."""
    ranks = run_ranks(tmp_path, "ema")
    assert states_equal(ranks[0]["ema_start"], ranks[1]["ema_start"])
    assert ranks[0]["grads_at_agree"] == ranks[1]["grads_at_agree"] == [True]
