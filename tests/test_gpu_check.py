"""bench/gpu_check.py cannot rot: its --quick CPU run (tiny sizes) goes through every row here, writes its table,
and no row fails; rows that need a GPU, inductor or two processes are skipped with a reason."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_quick_cpu_run_writes_one_table_without_failures(tmp_path):
    pytest.importorskip("lmdb")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
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
                "train-prior --checkpoint-activations"]
    must_run += [r for r in rows if r.startswith(("extract-codes", "evaluate"))]
    if _has("constriction"):
        must_run.append("compress / decompress")
    assert all(rows[r] == "ok" for r in must_run), {r: rows[r] for r in must_run}
    assert all(status in ("ok",) or status.startswith("skipped: ") for status in rows.values())
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

    recorder = Recorder()
    load_script("gpu_check", "bench").run_all(recorder)
    return recorder.rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
