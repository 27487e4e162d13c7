"""Kill-safety and graceful stop of real processes: training is SIGKILLed at random steps, stopped with SIGTERM and
SIGINT, and resumed to the end; an extraction is SIGKILLed mid-way and re-run. Checkpoints and code caches are
never left corrupt or taken as finished, and at most one checkpoint interval of work is lost per kill."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.checkpoint import read_checkpoint
from vqprior.data.codes import CodeDataset, read_code_metadata
from vqprior.errors import UserError

STEPS, EVERY = 40, 2
TRAIN = ["train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "64", "--steps", str(STEPS),
         "--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--sample-every", "1000",
         "--eval-limit", "16", "--num-samples", "4", "--checkpoint-every", str(EVERY), "--device", "cpu"]
# One thread per process: the machine is shared, and oversubscribed threads make tiny steps very slow.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMEOUT_S = 120


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """The ``vqprior`` CLI as a real process; its stderr (progress bars) goes to ``log``."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "vqprior.commands.cli", *args], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=ENV)


def _progress(log: Path, total: int) -> int:
    """The last position a tqdm bar printed to ``log`` (0 before the first)."""
    found = re.findall(rf"(\d+)/{total} \[", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def _wait_for_progress(proc: subprocess.Popen, log: Path, total: int, at_least: int) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while (shown := _progress(log, total)) < at_least:
        assert proc.poll() is None, f"exited early ({proc.returncode}): {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)  # polling only: nothing depends on how long this waits
    return shown


def _check_run_dir(run: Path, previous: int) -> int:
    """After a kill: only our files (plus hidden temp files of an interrupted atomic write); the checkpoint, if
    any, loads, is the one resumed from (``previous``) or a later checkpoint-interval step, and is not a finished
    run. Returns its step (0 without one)."""
    for f in run.iterdir():
        assert f.name in ("latest.pt", "metrics.jsonl") or f.name.startswith("."), f.name
    if not (run / "latest.pt").exists():
        return 0
    step = read_checkpoint(run / "latest.pt", "pixels")["step"]
    assert (step == previous or step % EVERY == 0) and previous <= step < STEPS
    return step


def test_training_survives_kills_and_stops_gracefully(tmp_path):
    rng = random.Random(0)
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    saved = 0
    for round_, how in enumerate(["kill", "term", "kill", "int"]):
        args = TRAIN + ["--out", str(run)] + (["--resume"] if round_ else [])
        proc = _start(args, log)
        # Signal at a random step a few steps after the resume point, a random fraction of a step into it.
        _wait_for_progress(proc, log, STEPS, saved + rng.randint(1, 4))
        time.sleep(rng.uniform(0.0, 0.1))
        shown = _progress(log, STEPS)
        proc.send_signal({"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[how])
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        if how == "kill":
            assert proc.returncode == -signal.SIGKILL
            saved = _check_run_dir(run, saved)
            assert saved >= shown - EVERY, f"lost more than one checkpoint interval: shown {shown}, saved {saved}"
        else:
            # Graceful: exit 0, one line naming the step, and the checkpoint at exactly that step.
            assert proc.returncode == 0, log.read_text()[-2000:]
            match = re.fullmatch(r"Stopped at step (\d+); checkpoint saved to (.+)\.\n", out)
            assert match, out
            saved = int(match.group(1))
            assert saved >= shown and Path(match.group(2)) == run / "latest.pt"
            assert read_checkpoint(run / "latest.pt", "pixels")["step"] == saved
            assert "Traceback" not in log.read_text()

    # The last resume runs in-process (saves a process start); one thread, as in the subprocesses.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = check_ok(run_cli(*TRAIN, "--out", run, "--resume", "--quiet")).stdout
    finally:
        torch.set_num_threads(threads)
    assert out.startswith(f"step {STEPS}:")
    assert read_checkpoint(run / "latest.pt", "pixels")["step"] == STEPS
    # Records logged after a checkpoint by a killed run were dropped on resume: each step is logged once.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(10, STEPS + 1, 10))


def test_extraction_survives_a_kill(tmp_path):
    vq = tmp_path / "vq"
    check_ok(run_cli("train-vqvae", "--dataset", "sample", "--image-size", "16", "--limit", "16", "--steps", "1",
                     "--preset", "tiny", "--batch-size", "8", "--eval-limit", "8", "--num-samples", "2", "--quiet",
                     "--device", "cpu", "--out", vq))
    cache, log, count = tmp_path / "codes.lmdb", tmp_path / "stderr.txt", 300
    args = ["extract-codes", "--vqvae", str(vq / "latest.pt"), "--split", "test", "--limit", str(count),
            "--batch-size", "1", "--out", str(cache), "--device", "cpu"]
    proc = _start(args, log)
    _wait_for_progress(proc, log, count, random.Random(1).randint(1, 100))
    proc.kill()
    proc.wait(timeout=TIMEOUT_S)
    if _progress(log, count) < count:  # killed mid-way (not after the last record): the cache is unfinished
        with pytest.raises(UserError, match="unfinished"):
            read_code_metadata(cache)
    check_ok(run_cli(*args, "--quiet"))  # re-running rebuilds the unfinished cache (no --overwrite needed)
    meta = read_code_metadata(cache)
    assert meta["count"] == count
    dataset = CodeDataset(cache, "top")
    assert len(dataset) == count and dataset[count - 1]["top"].shape == dataset[0]["top"].shape
