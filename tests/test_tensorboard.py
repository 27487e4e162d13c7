"""``--tensorboard``: the optional TensorBoard mirror of metrics.jsonl (scalars and sample grids), and the one-line
error when the extra is not installed."""
from __future__ import annotations

import json
import sys

import pytest

from cli_support import run_cli, train_pixel_run


def test_tensorboard_mirrors_metrics_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_pixel_run(out, "--tensorboard", "--eval-every", "2", "--sample-every", "2", steps=10)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/bpd", "train/lr", "train/items_per_s", "eval/bpd"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "eval"):
        logged = {e.step: e.value for e in events.Scalars(f"{split}/bpd")}
        expected = {r["step"]: r["bpd"] for r in records if r["split"] == split}
        assert logged.keys() == expected.keys()
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6)
    # One image per sample grid written as PNG: every second step of the ten.
    image_steps = sorted(e.step for e in events.Images("samples"))
    png_steps = sorted(int(p.stem.removeprefix("samples_step")) for p in out.glob("samples_step*.png"))
    assert image_steps == png_steps == list(range(2, 11, 2))


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    # A None entry in sys.modules makes ``import torch.utils.tensorboard`` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    result = run_cli("train-pixels", "--dataset", "sample", "--image-size", "8", "--limit", "16", "--steps", "2",
                     "--preset", "tiny", "--quiet", "--device", "cpu", "--tensorboard", "--out", out)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "pip install 'vqprior[tensorboard]'" in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()
