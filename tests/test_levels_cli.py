"""A 3-level VQ-VAE through the same commands as the 2-level one, end to end on tiny sizes: train-vqvae --levels 3
-> extract-codes -> train-prior for every level -> sample -> decode, complete, compress/decompress, evaluate, info;
plus the library pieces (the prior chain, completion prefixes) and a 4-level extraction."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import check_ok, run_cli
from vqprior.checkpoint import load_model
from vqprior.data.codes import CodeDataset
from vqprior.errors import UserError
from vqprior.sampling.generate import encode_prefix, generate, prior_chain

NAMES = ["top", "middle", "bottom"]
SHAPES = {"top": [2, 2], "middle": [4, 4], "bottom": [8, 8]}  # 16x16 images, bottom stride 2, top stride 2
CPU = ["--device", "cpu"]


def lower(p):
    """The lower priors' options of a full 3-level sample."""
    return ["--middle", p.priors["middle"], "--bottom", p.priors["bottom"]]


def cache_codes(path):
    ds = CodeDataset(path)
    return [torch.stack([ds[i][name] for i in range(len(ds))]) for name in ds.level_names]


def test_caches_and_info_list_the_levels_in_order(levels_pipeline):
    p = levels_pipeline
    meta = CodeDataset(p.train_codes).metadata
    assert meta["level_names"] == NAMES and meta["shapes"] == [SHAPES[n] for n in NAMES]
    text = check_ok(run_cli("info", p.train_codes)).output
    assert "levels: top 2x2 (16 codes), middle 4x4 (16 codes), bottom 8x8 (16 codes)" in text
    facts = json.loads(check_ok(run_cli("info", p.vqvae, "--json")).output)
    assert [lv["level"] for lv in facts["levels"]] == NAMES and [lv["stride"] for lv in facts["levels"]] == [8, 4, 2]
    assert "levels, coarsest first: top (1 code per 8x8 pixels), middle" in check_ok(run_cli("info", p.vqvae)).output


def test_each_prior_is_conditioned_on_the_level_directly_above(levels_pipeline):
    p = levels_pipeline
    for i, name in enumerate(NAMES):
        facts = json.loads(check_ok(run_cli("info", p.priors[name], "--json")).output)
        arch, prior = facts["architecture"], facts["prior"]
        assert prior["level"] == name and prior["levels"] == 3
        assert [arch["height"], arch["width"]] == SHAPES[name]
        above = NAMES[i - 1] if i else None
        assert [arch["cond_height"], arch["cond_width"]] == (SHAPES[above] if above else [0, 0])
        assert arch["cond_num_codes"] == (16 if above else 0)
        assert [lv["level"] for lv in facts["vqvae"]["levels"]] == NAMES
        assert (p.priors[name].parent / "samples_step2.png").exists()  # its grid, decoded with the other levels
    # The bottom prior reads the middle codes: its likelihood of the test bottoms changes with them.
    bottom = load_model(p.priors["bottom"])
    top, middle, bot = cache_codes(p.test_codes)
    with torch.no_grad():
        given = bottom.log_prob(bot, condition=middle).sum()
        other = bottom.log_prob(bot, condition=(middle + 1) % 16).sum()
    assert given != other


def test_sample_then_decode_gives_the_same_images(levels_pipeline, tmp_path):
    p = levels_pipeline
    check_ok(run_cli("sample", p.priors["top"], *lower(p), "--num", 4, "--out", tmp_path / "s.png", "--save-codes",
                     tmp_path / "c.npz", "--save-array", tmp_path / "a.npy", "--animate", tmp_path / "a.gif",
                     "--quiet", *CPU))
    assert Image.open(tmp_path / "a.gif").n_frames > 3  # frames from every level's filling in
    with np.load(tmp_path / "c.npz") as codes:
        assert sorted(codes.files) == sorted(NAMES)
        assert [list(codes[n].shape[1:]) for n in NAMES] == [SHAPES[n] for n in NAMES]
    assert np.load(tmp_path / "a.npy").shape == (4, 3, 16, 16)
    check_ok(run_cli("decode", "--vqvae", p.vqvae, tmp_path / "c.npz", "--out", tmp_path / "d.png", *CPU))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), np.asarray(Image.open(tmp_path / "s.png")))
    # The naive sampler (a full forward pass per position) draws the same codes at every level.
    check_ok(run_cli("sample", p.priors["top"], *lower(p), "--num", 4, "--method", "naive", "--save-codes",
                     tmp_path / "n.npz", "--quiet", *CPU))
    with np.load(tmp_path / "c.npz") as a, np.load(tmp_path / "n.npz") as b:
        assert all(np.array_equal(a[n], b[n]) for n in NAMES)


def test_sampling_is_top_down(levels_pipeline):
    """Each lower level is sampled given the one above: fixing the top and middle codes as a full prefix (nothing
    left to sample there) and sampling the bottom equals sampling the bottom prior alone given those middle codes."""
    p = levels_pipeline
    top, middle, bottom = (load_model(p.priors[n]) for n in NAMES)
    g = torch.Generator().manual_seed(3)
    full = generate(top, 3, middle=[middle], bottom=bottom, generator=g)
    assert [list(c.shape[1:]) for c in full.codes] == [SHAPES[n] for n in NAMES]
    from vqprior.sampling.sampler import sample

    tops, mids = full.codes[0], full.codes[1]
    ref = sample(bottom, 3, condition=mids, generator=torch.Generator().manual_seed(5))
    again = generate(top, 3, middle=[middle], bottom=bottom, prefix=[tops, mids], start=[4, 16],
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.codes[0], tops) and torch.equal(again.codes[1], mids)
    assert torch.equal(again.codes[2], ref)
    other = sample(bottom, 3, condition=(mids + 1) % 16, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, ref)  # the condition matters (else the check above proves nothing)


def test_complete_keeps_each_levels_kept_rows(levels_pipeline, tmp_path):
    p = levels_pipeline
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    check_ok(run_cli("complete", p.priors["top"], *lower(p), "--image", tmp_path / "in.png", "--keep-rows", 8,
                     "--num", 2, "--out", tmp_path / "c.png", "--quiet", *CPU))
    assert (tmp_path / "c.png").stat().st_size > 0
    top, middle, bottom = (load_model(p.priors[n]) for n in NAMES)
    image = torch.from_numpy(np.array(Image.open(tmp_path / "in.png"))).permute(2, 0, 1)
    prefix = encode_prefix(top.vqvae, image, keep_rows=8)
    assert prefix.starts == [1 * 2, 2 * 4, 4 * 8]  # rows kept per level (strides 8, 4, 2) times the width
    out = generate(top, 2, middle=[middle], bottom=bottom, prefix=[c.expand(2, -1, -1) for c in prefix.codes],
                   start=prefix.starts, generator=torch.Generator().manual_seed(0))
    for code, kept, start in zip(out.codes, prefix.codes, prefix.starts):
        width = code.shape[-1]
        assert torch.equal(code.flatten(1)[:, :start], kept.flatten(1)[:, :start].expand(2, -1))
        assert start % width == 0


def test_compress_decompress_round_trip_is_exact(levels_pipeline, tmp_path):
    p = levels_pipeline
    out = check_ok(run_cli("compress", p.priors["top"], p.test_codes, "--out", tmp_path / "c.vqz", *lower(p),
                           *CPU)).output
    assert "2x2 + 4x4 + 8x8" in out
    check_ok(run_cli("decompress", p.priors["top"], tmp_path / "c.vqz", "--out", tmp_path / "back.npz", *lower(p),
                     *CPU))
    with np.load(tmp_path / "back.npz") as back:
        for name, codes in zip(NAMES, cache_codes(p.test_codes)):
            assert np.array_equal(back[name], codes.numpy()), name
    # Images: encoded by the VQ-VAE, coded, decoded back to the same reconstructions.
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    check_ok(run_cli("compress", p.priors["top"], images, "--out", tmp_path / "i.vqz", *lower(p), *CPU))
    check_ok(run_cli("decompress", p.priors["top"], tmp_path / "i.vqz", "--out", tmp_path / "i.npz", *lower(p),
                     *CPU))
    vq = load_model(p.vqvae)
    loaded = torch.stack([torch.from_numpy(np.array(Image.open(images / f"{i}.png"))).permute(2, 0, 1)
                          for i in range(2)])
    with np.load(tmp_path / "i.npz") as back:
        assert all(torch.equal(torch.from_numpy(back[n]), c) for n, c in zip(NAMES, vq.encode(loaded)))


def test_evaluate_scores_every_level(levels_pipeline):
    p = levels_pipeline
    for name in NAMES:
        out = check_ok(run_cli("evaluate", p.priors[name], "--codes", p.test_codes, "--quiet", *CPU)).output
        assert f"({name} codes)" in out and "bits/code" in out


def test_prior_chain_orders_middles_and_refuses_gaps():
    """Middle priors are matched by the level each records (any order); a missing or doubled one is an error."""
    from types import SimpleNamespace

    vq = SimpleNamespace(config=SimpleNamespace(levels=4))

    def prior(level):
        return SimpleNamespace(prior_info={"level": level, "levels": 4}, vqvae=vq, vqvae_sha256="x")

    top, m1, m2, bottom = prior("top"), prior("middle1"), prior("middle2"), prior("bottom")
    assert prior_chain(top, bottom, [m2, m1]) == [top, m1, m2, bottom]
    with pytest.raises(UserError, match="middle2 prior"):
        prior_chain(top, bottom, [m1])
    with pytest.raises(UserError, match="two middle1"):
        prior_chain(top, bottom, [m1, m1, m2])
    with pytest.raises(UserError, match="--bottom"):
        prior_chain(top, None, [m1, m2])


def test_four_levels_extract_every_level(tmp_path):
    check_ok(run_cli("train-vqvae", "--dataset", "sample", "--image-size", "16", "--levels", 4, "--limit", 8,
                     "--steps", 1, "--preset", "tiny", "--batch-size", 8, "--eval-limit", 8, "--num-samples", 2,
                     "--quiet", *CPU, "--out", tmp_path / "vq"))
    check_ok(run_cli("extract-codes", "--vqvae", tmp_path / "vq" / "latest.pt", "--split", "test", "--limit", 4,
                     "--out", tmp_path / "c.lmdb", "--quiet", *CPU))
    meta = CodeDataset(tmp_path / "c.lmdb").metadata
    assert meta["level_names"] == ["top", "middle1", "middle2", "bottom"]
    assert meta["shapes"] == [[1, 1], [2, 2], [4, 4], [8, 8]]


def test_guidance_names_the_unguided_levels(capsys):
    """--guidance guides every prior of the hierarchy that has a null class; the others are named on stderr."""
    from types import SimpleNamespace

    from vqprior.commands.sample import guidance_checks
    from vqprior.sampling.generate import guided_levels

    def prior(level, null_class):
        config = SimpleNamespace(num_classes=10, null_class=null_class)
        return SimpleNamespace(prior_info={"level": level, "levels": 3}, config=config)

    top, middle, bottom = prior("top", True), prior("middle", False), prior("bottom", True)
    assert guided_levels(bottom, [middle]) == ["the top prior", "the bottom prior"]
    guidance_checks(2.0, top, bottom, [middle])
    assert capsys.readouterr().err.strip() == ("--guidance 2 guides the top prior and the bottom prior only: the "
                                               "middle prior has no null class and is sampled given the class, "
                                               "unguided.")
    guidance_checks(2.0, top, bottom, [prior("middle", True)])
    assert capsys.readouterr().err == ""


def test_a_middle_prior_run_resumes_and_keeps_its_level(levels_pipeline, tmp_path):
    import shutil

    p = levels_pipeline
    run = tmp_path / "middle"
    shutil.copytree(p.priors["middle"].parent, run)
    refused = run_cli("train-prior", "--codes", p.train_codes, "--out", run, "--resume", "--level", "bottom",
                      "--quiet")
    assert refused.exit_code != 0 and "--level bottom (was middle)" in refused.output
    check_ok(run_cli("train-prior", "--codes", p.train_codes, "--out", run, "--resume", "--steps", 3, "--quiet",
                     *CPU))
    facts = json.loads(check_ok(run_cli("info", run / "latest.pt", "--json")).output)
    assert facts["step"] == 3 and facts["prior"]["level"] == "middle"
