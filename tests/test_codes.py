"""LMDB code cache and code priors: extraction round trip read through spawned DataLoader workers, metadata,
refusal to overwrite, unfinished / foreign / missing caches, out-of-range codes, codebook mismatches (each a
one-line UserError), and the PriorTask (loss decreases, evaluation, config and checkpoint extras, grid)."""
import math

import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vqprior.config import DataConfig, model_config_from_preset
from vqprior.data.codes import (
    COMPLETE_KEY,
    CodeDataset,
    check_codebook,
    encode_record,
    extract_codes,
    read_code_metadata,
    record_key,
)
from vqprior.errors import UserError
from vqprior.models.vqvae import VQVAE, vqvae_config_from_preset
from vqprior.training.prior_task import PriorTask, prior_model_config


class ImageSet(torch.utils.data.Dataset):
    """Synthetic image dataset with the dict items of vqprior's image datasets; can fail after ``fail_after``."""

    num_classes = 3

    def __init__(self, n=10, size=8, seed=0, fail_after=None):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 2, 2, generator=g)
        self.images = (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                       align_corners=False) * 255).round().to(torch.uint8)
        self.fail_after = fail_after

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.fail_after is not None and i >= self.fail_after:
            raise RuntimeError("simulated interruption")
        return {"image": self.images[i], "label": i % 3, "index": 100 + i}


def make_vqvae(levels=2):
    torch.manual_seed(0)
    vq = VQVAE(vqvae_config_from_preset("tiny", levels=levels))
    vq.init_codebooks(ImageSet().images)
    return vq.eval()


def extract(vq, path, dataset=None, **kwargs):
    return extract_codes(vq, dataset or ImageSet(), path, vqvae_sha256="ab" * 32, dataset_name="synthetic",
                         split="train", batch_size=4, progress=False, **kwargs)


def one_line_error(fn, match):
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return info.value


@pytest.fixture(scope="module")
def cache2(tmp_path_factory):
    vq = make_vqvae(levels=2)
    path = tmp_path_factory.mktemp("codes") / "codes.lmdb"
    extract(vq, path)
    return vq, path


def test_round_trip_through_spawned_workers(cache2):
    vq, path = cache2
    ds = CodeDataset(path)
    assert len(ds) == 10 and ds.levels == 2 and ds.level_names == ("top", "bottom")
    assert ds.shapes == [(2, 2), (4, 4)] and ds.codebook_size == 16 and ds.num_classes == 3
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    top = torch.cat([b["top"] for b in batches])
    bottom = torch.cat([b["bottom"] for b in batches])
    expected_top, expected_bottom = vq.encode(ImageSet().images)
    assert top.dtype == torch.int64 and torch.equal(top, expected_top) and torch.equal(bottom, expected_bottom)
    assert torch.cat([b["label"] for b in batches]).tolist() == [i % 3 for i in range(10)]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(100, 110))


def test_metadata_records_the_extraction(cache2):
    _, path = cache2
    meta = read_code_metadata(path)
    assert meta["format_version"] == 1 and meta["count"] == 10 and meta["levels"] == 2
    assert meta["shapes"] == [[2, 2], [4, 4]] and meta["codebook_sizes"] == [16, 16]
    assert meta["dataset"] == "synthetic" and meta["split"] == "train" and meta["vqvae_sha256"] == "ab" * 32
    assert meta["image_shape"] == [3, 8, 8]


def test_one_level_cache_has_only_top(tmp_path):
    vq = make_vqvae(levels=1)
    extract(vq, tmp_path / "c1")
    item = CodeDataset(tmp_path / "c1")[3]
    assert set(item) == {"top", "label", "index"} and item["top"].shape == (4, 4)
    assert torch.equal(item["top"], vq.encode(ImageSet().images[3:4])[0][0])
    one_line_error(lambda: CodeDataset(tmp_path / "c1", level="bottom"), "no bottom level")


def test_refuses_to_overwrite_a_finished_cache(tmp_path):
    vq = make_vqvae()
    extract(vq, tmp_path / "c")
    one_line_error(lambda: extract(vq, tmp_path / "c"), "overwrite")
    extract(vq, tmp_path / "c", dataset=ImageSet(n=6, seed=1), overwrite=True)
    ds = CodeDataset(tmp_path / "c")
    assert len(ds) == 6 and torch.equal(ds[0]["top"], vq.encode(ImageSet(n=6, seed=1).images[:1])[0][0])


def test_interrupted_extraction_is_never_taken_as_finished(tmp_path):
    vq = make_vqvae()
    with pytest.raises(RuntimeError, match="simulated"):
        extract(vq, tmp_path / "c", dataset=ImageSet(fail_after=6))
    one_line_error(lambda: CodeDataset(tmp_path / "c"), "unfinished")
    extract(vq, tmp_path / "c")  # re-running rebuilds it (no --overwrite needed)
    assert len(CodeDataset(tmp_path / "c")) == 10
    # An interrupted overwrite of a finished cache leaves it unfinished too: the marker goes first.
    with pytest.raises(RuntimeError, match="simulated"):
        extract(vq, tmp_path / "c", dataset=ImageSet(fail_after=2), overwrite=True)
    one_line_error(lambda: CodeDataset(tmp_path / "c"), "unfinished")


def test_missing_foreign_and_non_lmdb_paths(tmp_path):
    one_line_error(lambda: CodeDataset(tmp_path / "nothing"), "not found")
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: CodeDataset(tmp_path / "file"), "folder")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    one_line_error(lambda: CodeDataset(tmp_path / "folder"), "no data.mdb")
    env = lmdb.open(str(tmp_path / "foreign"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    one_line_error(lambda: CodeDataset(tmp_path / "foreign"), "not a vqprior code cache")
    vq = make_vqvae()
    one_line_error(lambda: extract(vq, tmp_path / "foreign"), "not a vqprior code cache")
    one_line_error(lambda: extract(vq, tmp_path / "folder"), "not a vqprior code cache")
    assert (tmp_path / "folder" / "notes.txt").exists()


def test_out_of_range_codes_are_a_clear_error(tmp_path):
    vq = make_vqvae()
    extract(vq, tmp_path / "c")
    env = lmdb.open(str(tmp_path / "c"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(record_key(4), encode_record(1, 104, [np.full((2, 2), 16), np.zeros((4, 4))]))
    env.close()
    ds = CodeDataset(tmp_path / "c")
    assert ds[3]["top"].max() < 16
    one_line_error(lambda: ds[4], r"record 4 .*top level.*outside the codebook")
    one_line_error(ds.validate_records, "outside the codebook")


def test_truncated_record_is_a_clear_error(tmp_path):
    extract(make_vqvae(), tmp_path / "c")
    env = lmdb.open(str(tmp_path / "c"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(record_key(0), b"\x00" * 20)
    env.close()
    one_line_error(lambda: CodeDataset(tmp_path / "c")[0], "corrupt")


def test_codebook_mismatch_between_cache_and_prior(cache2):
    _, path = cache2
    meta = read_code_metadata(path)
    check_codebook(meta, 16, "top")
    one_line_error(lambda: check_codebook(meta, 32, "bottom"), "codebook size mismatch.*16.*32")
    config = prior_model_config(model_config_from_preset("tiny"), meta, "top")
    wrong = prior_model_config(model_config_from_preset("tiny"), {**meta, "codebook_sizes": [8, 8]}, "top")
    data = DataConfig(dataset="synthetic", cache=str(path))
    PriorTask(config, data, "top")
    one_line_error(lambda: PriorTask(wrong, data, "top"), "codebook size mismatch")
    one_line_error(lambda: PriorTask(config, data, "top", {"config": {}, "weights": {}, "sha256": "cd" * 32}),
                   "different VQ-VAE")


@pytest.mark.parametrize("level", ["top", "bottom"])
def test_prior_task_loss_decreases(cache2, level):
    vq, path = cache2
    meta = read_code_metadata(path)
    config = prior_model_config(model_config_from_preset("tiny"), meta, level, class_conditional=True)
    assert (config.cond_num_codes > 0) == (level == "bottom") and config.num_classes == 3
    payload = {"config": {"model": vq.config.to_dict()}, "weights": vq.state_dict(), "sha256": "ab" * 32}
    task = PriorTask(config, DataConfig(dataset="synthetic", cache=str(path), class_conditional=True), level, payload)
    ds = CodeDataset(path, level)
    batch = next(iter(DataLoader(ds, batch_size=10)))
    torch.manual_seed(0)
    model = task.build_model()
    task.init_model(model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, metrics = task.loss(model.train(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[0]) and float(metrics["bits_per_code"]) == pytest.approx(losses[-1] / math.log(2))
    assert losses[-1] < 0.8 * losses[0]
    result = task.evaluate(model.eval(), DataLoader(ds, batch_size=4))
    with torch.no_grad():
        nll = -model.log_prob(batch[level], condition=batch["top"] if level == "bottom" else None,
                              label=batch["label"]).sum()
    assert result["bits_per_code"] == pytest.approx(float(nll) / (math.log(2) * batch[level].numel()), rel=1e-5)
    assert task.config_dicts()["prior"] == {"level": level, "codes": str(path), "levels": 2}
    assert task.extra_checkpoint()["vqvae"]["sha256"] == "ab" * 32


def test_prior_task_grid_decodes_samples(cache2):
    pytest.importorskip("vqprior.sampling.sampler")
    vq, path = cache2
    meta = read_code_metadata(path)
    payload = {"config": {"model": vq.config.to_dict()}, "weights": vq.state_dict(), "sha256": "ab" * 32}
    batch = next(iter(DataLoader(CodeDataset(path), batch_size=4)))
    for level in ("top", "bottom"):
        config = prior_model_config(model_config_from_preset("tiny"), meta, level)
        task = PriorTask(config, DataConfig(cache=str(path)), level, payload)
        grid = task.grid(task.build_model().eval(), batch, torch.Generator().manual_seed(0))
        assert grid.dtype == torch.uint8 and grid.shape == (4, 3, 8, 8)


def test_unfinished_marker_removed_by_hand_is_detected(tmp_path):
    extract(make_vqvae(), tmp_path / "c")
    env = lmdb.open(str(tmp_path / "c"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.delete(COMPLETE_KEY)
    env.close()
    one_line_error(lambda: read_code_metadata(tmp_path / "c"), "unfinished")


def test_prior_checkpoint_embeds_a_loadable_vqvae(tmp_path):
    from vqprior.checkpoint import load_model, save_checkpoint
    from vqprior.io import file_sha256
    from vqprior.training.prior_task import load_vqvae_payload

    vq = make_vqvae()
    save_checkpoint(tmp_path / "vq.pt", {"kind": "vqvae", "config": {"model": vq.config.to_dict()},
                                         "model": vq.state_dict(), "step": 0})
    payload = load_vqvae_payload(tmp_path / "vq.pt")
    assert payload["sha256"] == file_sha256(tmp_path / "vq.pt")
    path = tmp_path / "codes"
    extract_codes(vq, ImageSet(), path, payload["sha256"], "synthetic", "train", progress=False)
    config = prior_model_config(model_config_from_preset("tiny"), read_code_metadata(path), "bottom")
    task = PriorTask(config, DataConfig(cache=str(path)), "bottom", payload)
    save_checkpoint(tmp_path / "prior.pt", {"kind": "prior", "config": task.config_dicts(),
                                            "model": task.build_model().state_dict(), "step": 0,
                                            **task.extra_checkpoint()})
    prior = load_model(tmp_path / "prior.pt")
    codes = vq.encode(ImageSet().images[:2])
    assert torch.equal(prior.vqvae.decode(codes), vq.decode(codes))
    assert prior.prior_info == {"level": "bottom", "codes": str(path), "levels": 2}
