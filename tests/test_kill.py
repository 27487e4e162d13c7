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
GATE = Path(__file__).with_name("gated_cli.py")
TIMEOUT_S = 600  # a safety net against a hung process, never a pace: the tests wait for events, not for time


class Gated:
    """The ``vqprior`` CLI as a real process with ``method`` gated (tests/gated_cli.py): it runs exactly as many
    gated calls as the test lets through, so where a signal lands does not depend on how fast anything runs."""

    def __init__(self, method: str, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as err:  # its stderr (the gate lines, progress bars) goes to ``log``
            self.proc = subprocess.Popen([sys.executable, str(GATE), method, *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=False, env=ENV)

    def let_through(self, calls: int) -> None:
        self.proc.stdin.write(b"x" * calls)
        self.proc.stdin.flush()

    def open(self) -> None:
        """Let every further call through (end of file on the gate)."""
        self.proc.stdin.close()
        self.proc.stdin = None  # so that communicate() does not flush it

    def wait_at(self, call: int) -> None:
        """Block until the process waits at gated call number ``call`` (all earlier calls done)."""
        deadline = time.monotonic() + TIMEOUT_S
        while f"\ngate {call}\n" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"never reached gate {call}"
            time.sleep(0.02)  # polling only: nothing depends on how long this waits


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
        child = Gated("vqprior.training.pixel_task:PixelTask.loss", args, log)
        # Run to a random step a few steps after the resume point, then signal a random fraction into the next.
        done = saved + rng.randint(1, 4)
        child.let_through(done - saved)
        child.wait_at(done - saved)  # steps 1..done finished (checkpoints included), step done+1 not begun
        child.let_through(1)
        time.sleep(rng.uniform(0.0, 0.1))  # where in step done+1 the signal lands; any point is correct
        child.proc.send_signal({"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[how])
        if how != "kill":
            child.open()  # a stopped step still has to finish; it must not wait at the gate
        out, _ = child.proc.communicate(timeout=TIMEOUT_S)
        out = out.decode()
        if how == "kill":
            assert child.proc.returncode == -signal.SIGKILL
            saved = _check_run_dir(run, saved)
            # At most one checkpoint interval is lost: the last checkpoint at or before step done survived.
            assert done - done % EVERY <= saved <= done + 1, (done, saved)
        else:
            # Graceful: exit 0, one line naming the step, and the checkpoint at exactly that step: the step the
            # signal interrupted (done + 1), or the next one when it landed between the two.
            assert child.proc.returncode == 0, log.read_text()[-2000:]
            match = re.fullmatch(r"Stopped at step (\d+); checkpoint saved to (.+)\.\n", out)
            assert match, out
            saved = int(match.group(1))
            assert saved in (done + 1, done + 2) and Path(match.group(2)) == run / "latest.pt", (done, saved)
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
    child = Gated("vqprior.models.vqvae:VQVAE.encode", args, log)
    written = random.Random(1).randint(1, 100)
    child.let_through(written)
    child.wait_at(written)  # records 0..written-1 are in the cache, the rest are not
    child.proc.kill()
    child.proc.communicate(timeout=TIMEOUT_S)
    with pytest.raises(UserError, match="unfinished"):
        read_code_metadata(cache)
    check_ok(run_cli(*args, "--quiet"))  # re-running rebuilds the unfinished cache (no --overwrite needed)
    meta = read_code_metadata(cache)
    assert meta["count"] == count
    dataset = CodeDataset(cache, "top")
    assert len(dataset) == count and dataset[count - 1]["top"].shape == dataset[0]["top"].shape
