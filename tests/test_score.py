"""``vqprior score`` and ``vqprior ood-eval``: per-image bits are evaluate's bits/dim, the likelihood ratio and input
complexity are the differences they are defined as, a two-stage prior scores its codes, inputs come from a split,
folders, files or arrays, the evaluation writes its table, JSON and histograms, and bad inputs get one line."""
import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import check_ok, run_cli, train_pixel_run
from vqprior.checkpoint import load_model


def _table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one_line_error(result, *words):
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0]


def test_the_mean_per_image_bits_is_evaluates_figure_on_the_same_images(bad_input_artefacts, tmp_path):
    from torch.utils.data import DataLoader

    from vqprior.data.loader import load_image_dataset
    from vqprior.evaluation.likelihood import evaluate_nll
    from vqprior.evaluation.scoring import score_images

    px = bad_input_artefacts["px"]
    model = load_model(px)
    data = load_image_dataset("sample", "test", image_size=8, limit=0)
    data.length = 24
    per_image = score_images(model, data, "cpu", batch_size=7)["bits_per_dim"]
    whole = evaluate_nll(model, DataLoader(data, batch_size=64))["bits_per_value"]
    assert len(per_image) == 24 and math.isclose(per_image.mean(), whole, rel_tol=1e-12)
    assert per_image.std() > 0  # scores of single images, not one figure repeated
    out = tmp_path / "s.csv"
    shown = check_ok(run_cli("score", px, "--limit", 24, "--out", out, "--quiet")).output
    said = check_ok(run_cli("evaluate", px, "--limit", 24, "--quiet")).output
    assert f"bits_per_dim {whole:.4f}" in shown and said.startswith(f"{whole:.4f} bits/dim")
    rows = _table(out)
    assert [r["item"] for r in rows] == [str(i) for i in range(24)]
    assert [float(r["bits_per_dim"]) for r in rows] == per_image.tolist()  # written exactly
    assert [int(r["label"]) for r in rows] == data.labels[:24].tolist()


def test_ratio_and_complexity_are_the_differences_they_name(bad_input_artefacts, tmp_path):
    px, out = bad_input_artefacts["px"], tmp_path / "s.csv"
    check_ok(run_cli("train-pixels", "--dataset", "sample", "--image-size", 8, "--limit", 16, "--steps", 1,
                     "--preset", "tiny", "--perturb", 0.2, "--quiet", "--eval-limit", 4, "--num-samples", 2,
                     "--seed", 3, "--out", tmp_path / "bg"))
    check_ok(run_cli("score", px, "--limit", 6, "--background", tmp_path / "bg" / "latest.pt", "--codec", "png",
                     "--out", out, "--quiet"))
    rows = _table(out)
    for r in rows:
        bpd = float(r["bits_per_dim"])
        assert float(r["likelihood_ratio"]) == bpd - float(r["background_bits_per_dim"])
        assert float(r["complexity_png"]) == bpd - float(r["png_bits_per_dim"])
    assert len({r["likelihood_ratio"] for r in rows}) > 1
    from vqprior.data.loader import load_image_dataset

    image = load_image_dataset("sample", "test", image_size=8)[2]["image"].numpy().transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True, compress_level=9)
    assert float(rows[2]["png_bits_per_dim"]) == 8 * buffer.tell() / image.size


def test_images_from_folders_files_and_arrays(bad_input_artefacts, tmp_path):
    px, folder = bad_input_artefacts["px"], bad_input_artefacts["images"]
    files = sorted(folder.glob("*.png"))[:2]
    arrays = np.stack([np.asarray(Image.open(f)).transpose(2, 0, 1) for f in files])
    np.save(tmp_path / "a.npy", arrays)
    out = tmp_path / "s.csv"
    check_ok(run_cli("score", px, "--images", folder, "--images", files[0], "--images", tmp_path / "a.npy",
                     "--out", out, "--quiet"))
    rows = _table(out)
    count = len(list(folder.glob("*.png")))
    assert len(rows) == count + 3 and all(r["label"] == "" for r in rows)
    assert rows[count]["item"] == str(files[0]) and rows[-1]["item"] == f"{tmp_path / 'a.npy'}:1"
    by_name = {r["item"]: r["bits_per_dim"] for r in rows}
    assert by_name[str(files[0])] == rows[count + 1]["bits_per_dim"]  # the same image as a file and in an array
    assert by_name[str(files[1])] == rows[-1]["bits_per_dim"]


def test_a_two_stage_prior_scores_the_codes_of_its_level(bad_input_artefacts, tmp_path):
    from vqprior.data.loader import load_image_dataset
    from vqprior.evaluation.likelihood import ClassMarginal

    top, bottom = bad_input_artefacts["top"], bad_input_artefacts["bottom"]
    for prior in (top, bottom):
        check_ok(run_cli("score", prior, "--limit", 5, "--out", tmp_path / "s.csv", "--quiet"))
        rows = _table(tmp_path / "s.csv")
        assert len(rows) == 5 and set(rows[0]) == {"item", "label", "code_bits", "bits_per_code"}
    images = torch.stack([load_image_dataset("sample", "test", image_size=16)[i]["image"] for i in range(5)])
    model = load_model(bottom)
    codes = model.vqvae.encode(images)  # [top, bottom]
    nats = -model.log_prob(codes[1], condition=codes[0]).double().flatten(1).sum(1)
    assert [float(r["code_bits"]) for r in rows] == pytest.approx((nats / math.log(2)).tolist(), rel=1e-12)
    top_model = load_model(top)  # class-conditional: scored as the mixture over its classes
    check_ok(run_cli("score", top, "--limit", 5, "--out", tmp_path / "t.csv", "--quiet"))
    nats = -ClassMarginal(top_model).log_prob(top_model.vqvae.encode(images)[0])
    assert [float(r["code_bits"]) for r in _table(tmp_path / "t.csv")] == pytest.approx(
        (nats / math.log(2)).tolist(), rel=1e-12)


def test_ood_eval_prints_the_table_and_writes_json_and_one_histogram_per_score(tmp_path):
    from vqprior.evaluation.score_table import write_scores

    write_scores(tmp_path / "in.csv", [0, 1, 2], [0, 1, 0], {"a": np.array([1.0, 2, 3]), "b": np.array([0.0, 0, 1])})
    write_scores(tmp_path / "out.csv", ["x.png", "y.png"], None, {"a": np.array([2.0, 4]), "b": np.array([5.0, 6])})
    shown = check_ok(run_cli("ood-eval", tmp_path / "in.csv", tmp_path / "out.csv", "--json", tmp_path / "m.json",
                             "--histograms", tmp_path / "h", "--names", "fashion", "mnist")).output
    assert "0.7500" in shown.splitlines()[1] and shown.splitlines()[2].split()[1] == "1.0000"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["scores"]["a"]["auroc"] == 0.75 and metrics["ood"]["name"] == "mnist"
    for name in ("a", "b"):
        with Image.open(tmp_path / f"h_{name}.png") as im:
            assert im.format == "PNG" and im.width > 100


def test_bad_inputs_get_one_line(bad_input_artefacts, tmp_path, monkeypatch):
    px, top = bad_input_artefacts["px"], bad_input_artefacts["top"]
    out = tmp_path / "s.csv"
    train_pixel_run(tmp_path / "px16", steps=1, image_size=16, limit=8)
    _one_line_error(run_cli("score", px, "--background", tmp_path / "px16" / "latest.pt", "--out", out),
                    "--background models 3x16x16", "3x8x8")
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("score", px, "--images", tmp_path / "empty", "--out", out), "no images in")
    _one_line_error(run_cli("score", top, "--codec", "png", "--out", out), "two-stage prior")
    _one_line_error(run_cli("score", top, "--background", px, "--out", out), "two-stage prior")
    _one_line_error(run_cli("score", px, "--images", bad_input_artefacts["mnist"] / "test.npz", "--out", out),
                    "not a readable image")
    import PIL.features

    real = PIL.features.check
    monkeypatch.setattr(PIL.features, "check", lambda name: False if name == "webp" else real(name))
    _one_line_error(run_cli("score", px, "--codec", "webp", "--out", out), "without WebP")
    assert not out.exists()  # nothing half-written
    (tmp_path / "junk.csv").write_text("a,b\n1,2\n")
    _one_line_error(run_cli("ood-eval", tmp_path / "junk.csv", tmp_path / "junk.csv"), "not a score table")
    result = run_cli("score", px, "--images", bad_input_artefacts["images"], "--split", "train", "--out", out)
    assert result.exit_code == 2 and "--split does nothing with --images" in result.output
