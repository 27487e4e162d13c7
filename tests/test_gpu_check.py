"""bench/gpu_check.py cannot rot: its --quick CPU run (tiny sizes) goes through every row, appends its table, and no
row fails; rows that need a GPU, inductor or two processes are skipped with a reason. Its budgets are hard: a row
past its budget is interrupted and fails, rows past the overall budget are skipped, and each row is in the table
as soon as it ends."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_one_table_without_failures(tmp_path):
    pytest.importorskip("lmdb")
    # A shared CPU may be slow: the overall budget (sized for a GPU) is widened so that no row is cut here; the
    # budgets themselves are tested below.
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--budget-minutes", "60", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=3900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| `")}
    assert not [r for r, status in rows.items() if status == "FAIL"]
    for command in ("train-pixels", "train-prior", "train-vqvae"):
        for precision in ("fp32", "tf32", "bf16"):
            assert rows[f"{command} --precision {precision}"] == "ok"
        assert rows[f"{command} --precision fp16"].startswith("skipped")
    must_run = ["train-pixels --resume", "train-pixels --deterministic (twice)", "sampling: cached vs naive",
                "sampling: compiled cached step", "train-pixels --checkpoint-activations",
                "train-prior --checkpoint-activations", "evaluate --precision bf16 (vs fp32)",
                "vqvae2-top: one training step, batch 4", "vqvae2-bottom: one training step, batch 4",
                "sample top + bottom prior (fresh process)"]
    must_run += [r for r in rows if r.startswith(("extract-codes", "evaluate cifar10"))]
    if _has("constriction"):
        must_run += ["compress / decompress", "compress / decompress with the priors (fresh processes)"]
    assert all(rows[r] == "ok" for r in must_run), {r: rows[r] for r in must_run}
    assert all(status in ("ok",) or status.startswith("skipped: ") for status in rows.values())
    assert rows["host syncs of training steps (set_sync_debug_mode)"].startswith("skipped")
    assert list(rows) == planned_rows("cpu") and table in done.stdout  # one line per row, none lost


def planned_rows(device: str) -> list[str]:
    """The names of the rows ``run_all`` runs, in order, recorded without running any."""
    import argparse

    from conftest import load_script

    class Recorder:
        args = argparse.Namespace(device=device, quick=True)
        rows: list[str] = []

        def row(self, command, fn, *args):
            self.rows.append(command)

    import sys

    from conftest import REPO

    recorder = Recorder()
    sys.path.insert(0, str(REPO / "bench"))  # gpu_check imports its row modules from beside it, as when run
    try:
        load_script("gpu_check", "bench").run_all(recorder)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return recorder.rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check

    return gpu_check


def _check(gpu_check, tmp_path, minutes: float):
    table = tmp_path / "gpu_check.md"
    table.write_text("header\n")
    args = argparse.Namespace(device="cpu", quick=True, budget_minutes=minutes, only=[])
    return gpu_check.Check(args, tmp_path, table), table


def test_a_row_past_its_budget_is_interrupted_and_fails_and_each_row_is_written_when_it_ends(gpu_check, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.0)
    c, table = _check(gpu_check, tmp_path, minutes=5)
    c.row("first", 60, lambda: "a figure")
    lines = table.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("| `first` | ok |") and lines[1].endswith("| a figure |")
    never = threading.Event()
    c.row("stuck", 0.2, never.wait)  # waits forever unless interrupted
    lines = table.read_text().splitlines()
    assert len(lines) == 3 and "| `stuck` | FAIL |" in lines[2] and "over its budget" in lines[2]
    assert c.failed


def test_rows_past_the_overall_budget_are_skipped(gpu_check, tmp_path):
    c, table = _check(gpu_check, tmp_path, minutes=0.0)
    ran = []
    c.row("late", 60, lambda: ran.append(1) or "x")
    assert ran == [] and "| `late` | skipped: past the overall budget |" in table.read_text()
    assert not c.failed
