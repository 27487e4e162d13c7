"""``vqprior plot`` and vqprior.training.plot: reading metrics.jsonl, the metric choice, the training-time estimate, the
smoothing, what the figure draws, atomic output, the missing-matplotlib message and the bad-input rows.

Runs are synthetic metrics.jsonl files written here (plus one tiny real training run for the latest.pt path).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_support import check_ok, run_cli, train_pixel_run
from vqprior.errors import UserError
from vqprior.training import plot as vplot

pytest.importorskip("matplotlib")


def write_run(folder: Path, records: list[dict], extra_lines: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def pixel_records(n_train: int = 6, start_bpd: float = 8.0, rate: float = 80.0, seconds: bool = True) -> list[dict]:
    """Train records every 10 steps (bpd falling), an eval every 20 steps; train_seconds = 1 s per 10 steps."""
    out = []
    for i in range(1, n_train + 1):
        step = 10 * i
        r = {"step": step, "split": "train", "lr": 1e-3, "items_per_s": rate, "skipped_steps": 0,
             "bpd": start_bpd - 0.1 * i}
        if seconds:
            r["train_seconds"] = float(i)
        out.append(r)
        if step % 20 == 0:
            out.append({"step": step, "split": "eval", "bpd": start_bpd - 0.1 * i + 0.05})
    return out


def vqvae_records() -> list[dict]:
    return [{"step": 10, "split": "train", "items_per_s": 50.0, "skipped_steps": 0, "loss": 0.1,
             "mse": 255.0 ** 2 / 100, "train_seconds": 2.0},
            {"step": 10, "split": "eval", "mse": 255.0 ** 2 / 1000, "psnr": 30.0, "usage_top": 0.5}]


def prior_records() -> list[dict]:
    return [{"step": 10, "split": "train", "items_per_s": 50.0, "bits_per_code": 6.0, "train_seconds": 1.0},
            {"step": 10, "split": "eval", "bits_per_code": 6.5}]


# --- reading -------------------------------------------------------------------------------------------------------
def test_read_run_skips_cut_lines_and_keeps_the_last_record_of_a_step(tmp_path):
    records = pixel_records(3)
    write_run(tmp_path / "r", records[2:] + records[:2] + [{"step": 10, "split": "train", "bpd": 1.5}],
              extra_lines=['{"step": 40, "split": "tr', "[1, 2]", '{"split": "train", "bpd": 3}'])
    run = vplot.read_run(tmp_path / "r")
    assert [r["step"] for r in run.train] == [10, 20, 30]
    assert run.train[0]["bpd"] == 1.5  # logged again (after a resume): the later record wins
    assert [r["step"] for r in run.eval] == [20]


def test_metric_choice_per_run_kind(tmp_path):
    px = vplot.read_run(write_run(tmp_path / "px", pixel_records()))
    vq = vplot.read_run(write_run(tmp_path / "vq", vqvae_records()))
    pr = vplot.read_run(write_run(tmp_path / "pr", prior_records()))
    assert vplot.choose_metric([px], None) == "bpd"
    assert vplot.choose_metric([pr], None) == "bits_per_code"
    assert vplot.available_metrics(vq) == ["psnr", "mse"]
    assert vplot.choose_metric([vq], None) == "psnr"
    assert vplot.choose_metric([vq], "mse") == "mse"
    with pytest.raises(UserError, match="different metrics"):
        vplot.choose_metric([px, pr], None)
    with pytest.raises(UserError, match="no bpd records"):
        vplot.choose_metric([px, pr], "bpd")


def test_training_psnr_comes_from_the_training_mse(tmp_path):
    vq = vplot.read_run(write_run(tmp_path / "vq", vqvae_records()))
    train, held_out = vplot.run_curves(vq, "psnr")
    assert train.values[0] == pytest.approx(20.0)  # MSE = 255^2 / 100 -> 10 log10(100) dB
    assert held_out.values[0] == pytest.approx(30.0)


# --- training time -------------------------------------------------------------------------------------------------
def test_logged_train_seconds_are_used_as_they_are():
    records = [{"step": 10, "items_per_s": 1.0, "train_seconds": 3.5}, {"step": 20, "items_per_s": 1.0,
                                                                         "train_seconds": 7.25}]
    np.testing.assert_allclose(vplot.train_seconds(records, batch_size=None), [3.5, 7.25])


def test_time_estimate_from_items_per_s_counts_taken_steps_only():
    # batch 8. Window 1: 10 steps at 80 items/s -> 1 s. Window 2: 10 steps, 2 of them skipped (8 taken) at 32 items/s
    # -> 2 s. Then a resume (skipped_steps restarts at 0) with one skipped step in a 5-step window at 16 items/s: 2 s.
    records = [{"step": 10, "items_per_s": 80.0, "skipped_steps": 0},
               {"step": 20, "items_per_s": 32.0, "skipped_steps": 2},
               {"step": 25, "items_per_s": 16.0, "skipped_steps": 1}]
    np.testing.assert_allclose(vplot.train_seconds(records, batch_size=8), [1.0, 3.0, 5.0])
    assert vplot.train_seconds(records, batch_size=None) is None
    assert vplot.train_seconds([{"step": 10, "bpd": 1.0}], batch_size=8) is None  # no throughput logged


def test_eval_points_get_the_time_of_their_step(tmp_path):
    records = pixel_records(4, seconds=False)  # 80 items/s; the batch size comes from latest.pt, absent here
    run = vplot.read_run(write_run(tmp_path / "r", records))
    train, held_out = vplot.run_curves(run, "bpd")
    assert train.seconds is None and held_out.seconds is None
    run = vplot.read_run(write_run(tmp_path / "s", pixel_records(4)))
    train, held_out = vplot.run_curves(run, "bpd")
    np.testing.assert_allclose(train.seconds, [1, 2, 3, 4])
    np.testing.assert_allclose(held_out.seconds, [2, 4])  # evals at steps 20 and 40


def test_a_real_run_estimates_its_time_from_latest_pt(tmp_path):
    train_pixel_run(tmp_path / "run", "--eval-every", "10", steps=20)
    run = vplot.read_run(tmp_path / "run")
    assert vplot.batch_size_of(run) == 8
    train, held_out = vplot.run_curves(run, "bpd")
    assert list(train.steps) == [10, 20] and list(held_out.steps) == [10, 20]
    assert np.all(np.diff(np.concatenate([[0.0], train.seconds])) > 0)
    np.testing.assert_allclose(held_out.seconds, train.seconds)


# --- smoothing and the figure --------------------------------------------------------------------------------------
def test_smoothing_is_a_debiased_ema():
    np.testing.assert_allclose(vplot.smooth(np.full(5, 3.0), 0.9), 3.0)  # no pull towards 0 at the start
    values = np.array([1.0, 5.0, 2.0])
    np.testing.assert_array_equal(vplot.smooth(values, 0.0), values)
    s = vplot.smooth(values, 0.5)
    assert s[0] == pytest.approx(1.0)
    assert s[1] == pytest.approx((0.25 * 1 + 0.5 * 5) / 0.75)
    with pytest.raises(UserError):
        vplot.smooth(values, 1.0)


def test_figure_overlays_runs_against_steps_and_time(tmp_path):
    a = vplot.read_run(write_run(tmp_path / "a", pixel_records(4)))
    b = vplot.read_run(write_run(tmp_path / "b", pixel_records(2, start_bpd=7.0)))
    metric, curves = vplot.select_curves([a, b], labels=["big", "small"])
    fig = vplot.draw_curves(metric, curves, x="both")
    steps_ax, time_ax = fig.axes
    legend = [t.get_text() for t in time_ax.get_legend().get_texts()]
    assert legend == ["big (train)", "big (held-out)", "small (train)", "small (held-out)"]
    lines = {line.get_label(): line for line in time_ax.get_lines()}
    np.testing.assert_allclose(lines["big (held-out)"].get_xdata(), [2, 4])  # seconds (< 2 minutes)
    np.testing.assert_allclose(lines["big (held-out)"].get_ydata(), [7.85, 7.65])
    steps = {line.get_label(): line for line in steps_ax.get_lines()}
    np.testing.assert_allclose(steps["small (train)"].get_xdata(), [10, 20])
    assert "time (seconds)" in time_ax.get_xlabel() and "bits/dim" in steps_ax.get_ylabel()


def test_time_unit_follows_the_longest_run(tmp_path):
    records = [{"step": 10 * i, "split": "train", "bpd": 5.0, "train_seconds": 3600.0 * i} for i in range(1, 4)]
    run = vplot.read_run(write_run(tmp_path / "long", records))
    metric, curves = vplot.select_curves([run], x="time", split="train")
    fig = vplot.draw_curves(metric, curves, x="time", smoothing=0.5)
    (ax,) = fig.axes
    assert "hours" in ax.get_xlabel()
    smoothed = [line for line in ax.get_lines() if line.get_label() == "long (train)"][0]
    np.testing.assert_allclose(smoothed.get_xdata(), [1, 2, 3])
    assert len(ax.get_lines()) == 2  # with smoothing the raw training curve stays, faint, unlabeled


def test_split_eval_draws_only_held_out(tmp_path):
    run = vplot.read_run(write_run(tmp_path / "r", pixel_records()))
    _, curves = vplot.select_curves([run], split="eval")
    assert curves[0][1]["train"] is None and list(curves[0][1]["eval"].steps) == [20, 40, 60]


# --- the command ---------------------------------------------------------------------------------------------------
def test_plot_command_writes_an_image(tmp_path):
    write_run(tmp_path / "a", pixel_records())
    write_run(tmp_path / "b", pixel_records(start_bpd=7.5))
    result = check_ok(run_cli("plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "both.png", "--smooth",
                              "0.6", "--title", "two runs"))
    assert "bpd curves of 2 run(s)" in result.output and "a: train 7.4" in result.output
    check_ok(run_cli("plot", tmp_path / "a", "--out", tmp_path / "steps.png", "--x", "steps"))
    wide, narrow = Image.open(tmp_path / "both.png"), Image.open(tmp_path / "steps.png")
    assert wide.format == narrow.format == "PNG"
    assert wide.size[0] > 1.8 * narrow.size[0]  # two panels side by side vs one
    check_ok(run_cli("plot", tmp_path / "a", "--out", tmp_path / "c.svg", "--split", "train"))
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "both.png", "c.svg", "steps.png"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    write_run(tmp_path / "a", pixel_records())
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    result = run_cli("plot", tmp_path / "a", "--out", out)
    assert result.exit_code == 1 and "No space left" in result.output
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "curves.png"]


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    write_run(tmp_path / "a", pixel_records())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = run_cli("plot", tmp_path / "a", "--out", tmp_path / "c.png")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: vqprior plot needs matplotlib: pip install 'vqprior[plot]'"
    assert not (tmp_path / "c.png").exists()


# --- bad input: (setup, extra args, exit code, word in the one-line error) -----------------------------------------
def _no_metrics(root):
    (root / "run").mkdir()


def _empty(root):
    write_run(root / "run", [])


def _garbage(root):
    write_run(root / "run", [], extra_lines=["not json", '{"step": "x", "split": "train"}', '{"step": 3}'])


def _mixed(root):
    write_run(root / "run", pixel_records())
    write_run(root / "other", prior_records())


def _pixels(root):
    write_run(root / "run", pixel_records())


def _no_time(root):
    write_run(root / "run", pixel_records(seconds=False))  # items_per_s but no latest.pt for the batch size


def _no_eval(root):
    write_run(root / "run", [r for r in pixel_records() if r["split"] == "train"])


def _inf_only(root):
    write_run(root / "run", [{"step": 10, "split": "eval", "psnr": math.inf, "train_seconds": 1.0}])


def _file_not_folder(root):
    (root / "run").write_text("{}\n")


BAD = [
    ("missing folder", None, ["run"], 1, "run folder not found"),
    ("a file, not a folder", _file_not_folder, ["run"], 1, "not a run folder"),
    ("folder without metrics.jsonl", _no_metrics, ["run"], 1, "no metrics.jsonl"),
    ("empty metrics.jsonl", _empty, ["run"], 1, "no training or held-out records"),
    ("metrics.jsonl without records", _garbage, ["run"], 1, "no training or held-out records"),
    ("mixed metric kinds, no --metric", _mixed, ["run", "other"], 1, "different metrics"),
    ("--metric the run does not log", _pixels, ["run", "--metric", "psnr"], 1, "no psnr records"),
    ("--metric of one run only", _mixed, ["run", "other", "--metric", "bpd"], 1, "no bpd records"),
    ("too few --label", _mixed, ["run", "other", "--label", "x"], 2, "--label"),
    ("unknown --metric", _pixels, ["run", "--metric", "loss"], 2, "--metric"),
    ("--smooth 1", _pixels, ["run", "--smooth", "1"], 2, "--smooth"),
    ("no time for --x time", _no_time, ["run", "--x", "time"], 1, "training time"),
    ("no time for --x both", _no_time, ["run"], 1, "--x steps"),
    ("--split eval without evals", _no_eval, ["run", "--split", "eval"], 1, "no held-out bpd"),
    ("only infinite values", _inf_only, ["run"], 1, "no training or held-out psnr"),
    ("no run folder", None, [], 2, "RUN_DIR"),
]


@pytest.mark.parametrize("setup, args, code, word", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error(tmp_cwd, setup, args, code, word):
    if setup:
        setup(tmp_cwd)
    before = sorted(p.name for p in tmp_cwd.iterdir())
    result = run_cli("plot", *args, "--out", "curves.png")
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and word in errors[0], result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_cwd.iterdir()) == before  # nothing written, no temp file


@pytest.mark.parametrize("out, code, word", [("curves.jpg", 1, "--out must end in .png, .pdf, .svg"),
                                             ("missing/curves.png", 1, "output folder does not exist"),
                                             (".", 2, "is a directory")])
def test_bad_out_is_a_one_line_error(tmp_cwd, out, code, word):
    _pixels(tmp_cwd)
    result = run_cli("plot", "run", "--out", out)
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and word in errors[0], result.output
    assert sorted(p.name for p in tmp_cwd.iterdir()) == ["run"]
