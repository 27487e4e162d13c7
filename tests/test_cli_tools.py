"""The CLI's looking and sharing tools and its outputs: ``info``, ``presets``, ``--version``, ``--threads``,
``evaluate`` of a VQ-VAE, exports without machine paths, image files in the format of their suffix, ``sample
--out-dir`` and ``--save-array`` alone, ``decode --vqvae``, and output folders created with their parents."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import TRAIN_FAST, absolute_paths_in, check_ok, run_cli
from vqprior.checkpoint import read_checkpoint
from vqprior.config import PRESETS
from vqprior.models.vqvae import VQVAE_PRESETS


@pytest.fixture
def pixel_ckpt(pixel_run):
    return pixel_run.checkpoint


def metrics_of(run, split="eval"):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == split]


def image_file(path):
    with Image.open(path) as im:
        return im.format, np.asarray(im.convert("RGB"))


# --- info, presets, version, threads ------------------------------------------------------------------------------

def test_info_describes_a_training_checkpoint_and_its_export(pixel_run, pixel_ckpt, tmp_path):
    data = read_checkpoint(pixel_ckpt)
    facts = json.loads(check_ok(run_cli("info", pixel_ckpt, "--json")).output)
    n_params = sum(p.numel() for p in __import__("vqprior").load_model(pixel_ckpt).parameters())
    assert (facts["kind"], facts["step"], facts["parameters"]) == ("pixels", pixel_run.steps, n_params)
    train = data["config"]["train"]
    assert facts["architecture"] == data["config"]["model"]
    assert facts["training"] == {**train, "effective_batch": train["batch_size"] * train["grad_accum"]}
    assert facts["data"] == data["config"]["data"] and facts["metrics"] == pytest.approx(data["metrics"])
    assert "training checkpoint" in facts["file"] and facts["storage_dtype"] == "float32"
    text = check_ok(run_cli("info", pixel_ckpt)).output
    assert text.splitlines()[0].endswith(f"pixels checkpoint, step {pixel_run.steps}, {n_params:,} parameters")
    for title in ("architecture:", "training:", "data:", "last metrics:"):
        assert title in text.splitlines()
    assert f"filters={data['config']['model']['filters']}" in text and "eval_bpd=" in text

    small = tmp_path / "small.pt"
    check_ok(run_cli("export", pixel_ckpt, "--out", small))
    exported = json.loads(check_ok(run_cli("info", small, "--json")).output)
    assert exported["parameters"] == n_params and exported["storage_dtype"] == "float16"
    assert exported["file"].startswith("exported")


def test_info_of_a_prior_shows_the_embedded_vqvae(prior_pipeline):
    facts = json.loads(check_ok(run_cli("info", prior_pipeline.bottom, "--json")).output)
    vq = read_checkpoint(prior_pipeline.vqvae)
    assert facts["kind"] == "prior" and facts["prior"]["level"] == "bottom"
    assert facts["vqvae"]["architecture"] == vq["config"]["model"]
    assert facts["vqvae"]["parameters"] == sum(p.numel() for p in __import__("vqprior").load_model(
        prior_pipeline.vqvae).parameters())
    text = check_ok(run_cli("info", prior_pipeline.bottom)).output
    assert re.search(r"^embedded VQ-VAE: [\d,]+ parameters, sha256 [0-9a-f]{64}$", text, re.MULTILINE)


def test_info_describes_a_code_cache(prior_pipeline):
    from vqprior.data.codes import CodeDataset, read_code_metadata
    from vqprior.io import file_sha256

    codes = json.loads(check_ok(run_cli("info", str(prior_pipeline.train_codes), "--json")).output)
    meta = read_code_metadata(prior_pipeline.train_codes)
    assert codes["kind"] == "code cache"
    assert codes["count"] == meta["count"] == len(CodeDataset(prior_pipeline.train_codes)) == prior_pipeline.train_items
    assert codes["vqvae_sha256"] == file_sha256(prior_pipeline.vqvae)
    assert codes["built_from"]["split"] == "train" and codes["levels"][1]["level"] == "bottom"
    assert [lv["shape"] for lv in codes["levels"]] == meta["shapes"]
    assert [lv["codebook_size"] for lv in codes["levels"]] == meta["codebook_sizes"]
    assert codes["vqvae_sha256"] == meta["vqvae_sha256"] and codes["num_classes"] == meta["num_classes"]
    text = check_ok(run_cli("info", str(prior_pipeline.train_codes))).output
    assert f"source VQ-VAE sha256: {meta['vqvae_sha256']}" in text and "levels: top " in text


def test_presets_lists_every_field_of_every_preset():
    lines = check_ok(run_cli("presets")).output.splitlines()
    blocks, counts, title, name = {}, {}, None, None
    for line in lines:
        if not line.startswith(" "):
            title = line.split()[0]  # "PixelSNAIL" or "VQ-VAE"
        elif not line.startswith("    "):
            name, rest = line.strip().split(": ", 1)  # "  name: 1,234 parameters ..."
            counts[title, name] = int(rest.split()[0].replace(",", ""))
            blocks[title, name] = ""
        else:
            blocks[title, name] += " " + line.strip()
    for title, table in (("PixelSNAIL", PRESETS), ("VQ-VAE", VQVAE_PRESETS)):
        assert {n for t, n in blocks if t == title} == set(table)
        for name, fields in table.items():
            shown = dict(item.split("=") for item in blocks[title, name].replace(",", " ").split())
            assert all(shown[key] == str(value) for key, value in fields.items()), (name, shown)
    # The counts (taken on the meta device) are those of real models built for the use each line names.
    from vqprior.config import DEFAULT_PRESET_USE, PRESET_USES, model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL
    from vqprior.models.vqvae import VQVAE, vqvae_config_from_preset
    for name in ("tiny", "small", "vqvae2-top", "vqvae2-bottom"):
        model = PixelSNAIL(model_config_from_preset(name, **PRESET_USES.get(name, DEFAULT_PRESET_USE)[1]))
        assert counts["PixelSNAIL", name] == sum(p.numel() for p in model.parameters())
    assert counts["VQ-VAE", "vqvae2-256"] == sum(p.numel() for p in VQVAE(vqvae_config_from_preset(
        "vqvae2-256")).parameters()) == 1_388_867  # rosinality's VQVAE() has exactly this many


def test_version_names_torch_and_the_device():
    out = check_ok(run_cli("--version")).output
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert out.startswith(f"vqprior {__import__('vqprior').__version__}, torch {torch.__version__}, default device "
                          f"{device}")


def test_threads_sets_torch_threads_on_any_command(pixel_ckpt):
    before = torch.get_num_threads()
    try:
        for n in (2, 1):
            check_ok(run_cli("info", pixel_ckpt, "--threads", n))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    from vqprior.commands.cli import cli

    assert all(any(p.name == "threads" for p in c.params) for c in cli.commands.values())


# --- evaluate a VQ-VAE ----------------------------------------------------------------------------------------------

def test_evaluate_vqvae_reports_the_trainers_held_out_metrics(prior_pipeline):
    # The trainer evaluated the same weights on the first 16 held-out images (--eval-limit 16).
    m = metrics_of(prior_pipeline.vqvae.parent)[-1]
    out = check_ok(run_cli("evaluate", prior_pipeline.vqvae, "--limit", "16", "--quiet", "--device", "cpu")).output
    found = re.search(r"MSE ([\d.]+) \(0\.\.255 scale\), PSNR ([\d.]+) dB on sample test: 16 images; "
                      r"top: usage ([\d.]+)%, perplexity ([\d.]+) of 16; bottom: usage ([\d.]+)%, perplexity ([\d.]+)",
                      out)
    assert found, out
    mse, psnr, usage_top, ppl_top, usage_bottom, ppl_bottom = map(float, found.groups())
    assert mse == pytest.approx(m["mse"], abs=0.01) and psnr == pytest.approx(m["psnr"], abs=0.01)
    assert usage_top == pytest.approx(100 * m["usage_top"], abs=0.05)
    assert usage_bottom == pytest.approx(100 * m["usage_bottom"], abs=0.05)
    assert ppl_top == pytest.approx(m["perplexity_top"], abs=0.05)
    assert ppl_bottom == pytest.approx(m["perplexity_bottom"], abs=0.05)


# --- exports carry no machine paths ---------------------------------------------------------------------------------

def test_export_holds_no_absolute_path_and_re_exports_identically(prior_pipeline, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    run = tmp_path / "run"
    check_ok(run_cli("train-pixels", "--dataset", "folder", "--data-dir", images.resolve(), *TRAIN_FAST,
                     "--out", run))
    assert read_checkpoint(run / "latest.pt")["config"]["data"]["data_dir"] == str(images.resolve())
    for src in (run / "latest.pt", prior_pipeline.top, prior_pipeline.bottom, prior_pipeline.vqvae):
        once, twice = tmp_path / f"{src.parent.name}-1.pt", tmp_path / f"{src.parent.name}-2.pt"
        check_ok(run_cli("export", src, "--out", once))
        check_ok(run_cli("export", once, "--out", twice))  # an export of an export
        for path in (once, twice):
            data = torch.load(path, map_location="cpu", weights_only=True)
            assert not absolute_paths_in(data), (src, absolute_paths_in(data))
            assert str(tmp_path).encode() not in path.read_bytes()
        a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (once, twice))
        assert a["config"] == b["config"] and a["metrics"] == b["metrics"] and a["step"] == b["step"]
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), name
    # The dataset's name survives, its folder does not: evaluating the export names the folder explicitly.
    exported = read_checkpoint(tmp_path / "run-1.pt")["config"]["data"]
    assert exported["dataset"] == "folder" and exported["data_dir"] == ""
    scores = [float(re.search(r"([\d.]+) bits/dim", check_ok(run_cli(
        "evaluate", p, "--data-dir", images, "--quiet", "--device", "cpu", *extra)).output).group(1))
        for p, extra in ((run / "latest.pt", ()), (tmp_path / "run-1.pt", ()), (tmp_path / "run-2.pt", ()))]
    assert scores[1] == scores[2] and abs(scores[0] - scores[1]) < 0.01


# --- outputs ------------------------------------------------------------------------------------------------------

def test_image_outputs_take_the_format_of_their_suffix(pixel_ckpt, tmp_path):
    array = tmp_path / "s.npy"
    check_ok(run_cli("sample", pixel_ckpt, "--num", "4", "--seed", "2", "--save-array", array, "--out",
                     tmp_path / "s.png", "--device", "cpu"))
    reference = image_file(tmp_path / "s.png")[1]
    for suffix, fmt, lossless in ((".jpg", "JPEG", False), (".jpeg", "JPEG", False), (".webp", "WEBP", False),
                                  (".bmp", "BMP", True), (".tif", "TIFF", True)):
        out = tmp_path / f"s{suffix}"
        check_ok(run_cli("sample", pixel_ckpt, "--num", "4", "--seed", "2", "--out", out, "--device", "cpu"))
        found, pixels = image_file(out)
        assert found == fmt, suffix
        if lossless:
            np.testing.assert_array_equal(pixels, reference)
        else:
            assert pixels.shape == reference.shape and np.abs(pixels.astype(int) - reference).mean() < 40
    gif, apng = tmp_path / "a.gif", tmp_path / "a.png"
    check_ok(run_cli("sample", pixel_ckpt, "--num", "2", "--save-array", array, "--animate", gif, "--device", "cpu"))
    check_ok(run_cli("sample", pixel_ckpt, "--num", "2", "--save-array", array, "--animate", apng, "--device", "cpu"))
    for path, fmt in ((gif, "GIF"), (apng, "PNG")):
        with Image.open(path) as im:
            assert im.format == fmt and im.n_frames >= 2


def test_out_dir_writes_one_png_per_sample_and_save_array_needs_no_grid(pixel_ckpt, tmp_path):
    array, folder = tmp_path / "a.npy", tmp_path / "new" / "samples"
    result = check_ok(run_cli("sample", pixel_ckpt, "--num", "3", "--seed", "4", "--save-array", array,
                              "--out-dir", folder, "--device", "cpu"))
    assert "wrote 3 samples" in result.output
    images = np.load(array)
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    for i in range(3):
        fmt, pixels = image_file(folder / f"{i:04d}.png")
        assert fmt == "PNG"
        np.testing.assert_array_equal(pixels, images[i].transpose(1, 2, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "new"]  # no grid, no temp folder left
    # An existing folder with files takes new ones only with --overwrite, which replaces same-named files.
    (folder / "notes.txt").write_text("mine")
    assert run_cli("sample", pixel_ckpt, "--num", "2", "--seed", "5", "--out-dir", folder).exit_code == 1
    check_ok(run_cli("sample", pixel_ckpt, "--num", "2", "--seed", "5", "--out-dir", folder, "--overwrite",
                     "--save-array", array, "--scale", "2", "--device", "cpu"))
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png", "notes.txt"]
    assert image_file(folder / "0000.png")[1].shape == (16, 16, 3)  # --scale 2 of an 8x8 sample
    # --top-k at its "off" value is no option that does nothing
    check_ok(run_cli("sample", pixel_ckpt, "--num", "1", "--top-k", "0", "--save-array", array, "--device", "cpu"))


def test_decode_takes_the_vqvae_like_extract_codes(prior_pipeline, tmp_path):
    codes = tmp_path / "c.npz"
    check_ok(run_cli("sample", prior_pipeline.top, "--bottom", prior_pipeline.bottom, "--num", "2", "--class", "1",
                     "--save-codes", codes, "--out", tmp_path / "s.png", "--device", "cpu"))
    decoded = tmp_path / "decoded.png"
    check_ok(run_cli("decode", "--vqvae", prior_pipeline.vqvae, codes, "--out", decoded, "--device", "cpu"))
    np.testing.assert_array_equal(image_file(decoded)[1], image_file(tmp_path / "s.png")[1])
    assert run_cli("decode", prior_pipeline.vqvae, codes, "--out", decoded).exit_code == 2  # --vqvae is required


def test_extract_codes_creates_missing_parent_folders(prior_pipeline, tmp_path):
    out = tmp_path / "a" / "b" / "codes.lmdb"
    check_ok(run_cli("extract-codes", "--vqvae", prior_pipeline.vqvae, "--split", "test", "--limit", "4", "--out", out,
                     "--quiet", "--device", "cpu"))
    assert (out / "data.mdb").is_file()
