"""The image cache's encodings (raw, lossless PNG, JPEG at a chosen quality), resuming an interrupted build, reading
format 1 caches, decoding in DataLoader workers, and ``vqprior info`` on image and code caches."""
import json

import lmdb
import pytest
import torch

from cli_support import check_ok, run_cli
from vqprior.data import image_cache
from vqprior.data.cache_info import describe_cache
from vqprior.data.datasets import ImageDataset
from vqprior.data.image_cache import CachedImageDataset, write_image_cache
from vqprior.data.loader import load_image_dataset
from vqprior.errors import UserError


def stack(dataset):
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


class Counting(ImageDataset):
    """Another dataset's items, recording which were read, failing at item ``fail_at`` (an interrupted build)."""

    def __init__(self, inner, fail_at=-1):
        super().__init__(inner.name, inner.split, len(inner), inner.channels, inner.height, inner.width,
                         inner.num_classes)
        self.image_size, self.inner, self.fail_at, self.read = inner.image_size, inner, fail_at, []

    def read_array(self, index):
        if index == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a build
        self.read.append(index)
        return self.inner.read_array(index)


class Gray(ImageDataset):
    """One-channel images: the first channel of the bundled sample."""

    def __init__(self, inner):
        super().__init__("gray", "test", len(inner), 1, inner.height, inner.width, inner.num_classes)
        self.inner = inner

    def read_array(self, index):
        array, label = self.inner.read_array(index)
        return array[:1].copy(), label


def test_png_is_lossless_jpeg_is_close_and_the_quality_matters(tmp_path):
    source = load_image_dataset("sample", "test", limit=100)  # real photographs (CIFAR-10), 32x32
    expected = stack(source)
    sizes = {}
    for encoding, quality in (("raw", 90), ("png", 90), ("jpeg", 95), ("jpeg", 50)):
        path = tmp_path / f"{encoding}{quality}.lmdb"
        write_image_cache(source, path, encoding=encoding, jpeg_quality=quality)
        cached = CachedImageDataset(path)
        images = stack(cached)
        assert torch.equal(torch.stack([cached[i]["label"] for i in range(100)]),
                           torch.stack([source[i]["label"] for i in range(100)]))
        sizes[encoding, quality] = describe_cache(path)[0]["bytes"]
        error = (images.float() - expected.float()).abs().mean().item()
        if encoding in ("raw", "png"):
            assert torch.equal(images, expected), encoding
        else:
            assert 0 < error < (4 if quality == 95 else 12), (quality, error)
            sizes["error", quality] = error
    assert sizes["error", 95] < sizes["error", 50]
    assert sizes["jpeg", 50] < sizes["jpeg", 95] < sizes["png", 90] < sizes["raw", 90]


def test_grayscale_png_round_trip_and_corrupt_record(tmp_path):
    gray = Gray(load_image_dataset("sample", "test", limit=10))
    write_image_cache(gray, tmp_path / "g.lmdb", encoding="png")
    cached = CachedImageDataset(tmp_path / "g.lmdb")
    assert cached.channels == 1 and torch.equal(stack(cached), stack(gray))
    cached.close()
    env = lmdb.open(str(tmp_path / "g.lmdb"))
    with env.begin(write=True) as txn:  # scramble the first encoded file's bytes
        value = bytearray(txn.get(b"%010d" % 0))
        value[4 + 12 * 10: 4 + 12 * 10 + 40] = bytes(40)
        txn.put(b"%010d" % 0, bytes(value))
    env.close()
    with pytest.raises(UserError, match="does not decode"):
        CachedImageDataset(tmp_path / "g.lmdb")[0]


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_an_interrupted_build_resumes_reading_only_the_rest(tmp_path, monkeypatch, encoding):
    monkeypatch.setattr(image_cache, "IMAGES_PER_RECORD", 4)
    monkeypatch.setattr(image_cache, "RECORDS_PER_COMMIT", 2)  # a transaction every 8 images
    source = load_image_dataset("sample", "test", limit=50)
    path = tmp_path / "k.lmdb"
    with pytest.raises(KeyboardInterrupt):
        write_image_cache(Counting(source, fail_at=21), path, encoding=encoding)
    facts = describe_cache(path)[0]
    assert not facts["complete"] and facts["written"] == 16  # two whole transactions of 8 made it in
    assert image_cache.read_cache_metadata(path) is None  # not usable until complete
    again = Counting(source)
    write_image_cache(again, path, encoding=encoding)
    assert again.read == list(range(16, 50))  # only the rest was read (and encoded)
    write_image_cache(source, tmp_path / "whole.lmdb", encoding=encoding)
    assert torch.equal(stack(CachedImageDataset(path)), stack(CachedImageDataset(tmp_path / "whole.lmdb")))
    with pytest.raises(KeyboardInterrupt):  # a different request over an unfinished cache starts from scratch
        write_image_cache(Counting(source, fail_at=9), tmp_path / "other.lmdb", encoding=encoding)
    fresh = Counting(source)
    write_image_cache(fresh, tmp_path / "other.lmdb", encoding="png")
    assert fresh.read == list(range(50))


def test_format_1_caches_still_read(tmp_path):
    source = load_image_dataset("sample", "test", limit=70)
    write_image_cache(source, tmp_path / "v1.lmdb")
    env = lmdb.open(str(tmp_path / "v1.lmdb"))
    with env.begin(write=True) as txn:  # what format 1 wrote: raw records, no encoding field
        meta = json.loads(txn.get(b"__meta__"))
        del meta["encoding"]
        txn.put(b"__meta__", json.dumps(dict(meta, format_version=1)).encode())
    env.close()
    assert torch.equal(stack(CachedImageDataset(tmp_path / "v1.lmdb")), stack(source))
    assert describe_cache(tmp_path / "v1.lmdb")[0]["encoding"] == "raw"


def test_encoded_cache_decodes_in_dataloader_workers(tmp_path):
    cached = load_image_dataset("sample", "test", image_size=16, cache=tmp_path, limit=40, cache_encoding="png")
    assert [p.name for p in tmp_path.glob("*.lmdb")] == ["sample-test-16px-first40-png.lmdb"]
    loader = torch.utils.data.DataLoader(cached, batch_size=8, num_workers=2, multiprocessing_context="spawn")
    images = torch.cat([b["image"] for b in loader])
    assert torch.equal(images, stack(load_image_dataset("sample", "test", image_size=16, limit=40)))


def test_info_describes_image_caches(tmp_path):
    load_image_dataset("sample", "test", image_size=16, cache=tmp_path / "k", limit=20, cache_encoding="jpeg",
                       jpeg_quality=80)
    load_image_dataset("sample", "test", image_size=16, cache=tmp_path / "k", limit=10)
    text = check_ok(run_cli("info", str(tmp_path / "k"))).output
    assert "20 images of 3x16x16 stored as jpeg (quality 80), complete" in text
    assert "10 images of 3x16x16 stored as raw, complete" in text
    facts = json.loads(check_ok(run_cli("info", str(tmp_path / "k" / "sample-test-16px-first10.lmdb"),
                                        "--json")).output)
    assert facts["kind"] == "image cache" and facts["count"] == 10 and facts["built_from"]["limit"] == 10


def test_a_reader_follows_a_build_in_another_process(tmp_path):
    """A handle opened on an unfinished cache keeps working while another process resumes the build past its map
    (LMDB's MDB_MAP_RESIZED is adopted) and after another process rebuilds the cache (a new file is reopened), so
    `info` can watch a build and a reader sees what is on disk."""
    import subprocess
    import sys

    path = tmp_path / "k.lmdb"
    write = ("import sys; from vqprior.data.loader import load_image_dataset; from vqprior.data.image_cache import "
             "write_image_cache; write_image_cache(load_image_dataset('sample', 'train', image_size=64, "
             "limit=int(sys.argv[2])), sys.argv[1])")
    source = load_image_dataset("sample", "train", image_size=64, limit=2000)  # 12 KiB per image, 24 MiB in all
    with pytest.raises(KeyboardInterrupt):
        write_image_cache(Counting(source, fail_at=1100), path)
    assert describe_cache(path)[0]["written"] == 1024  # this process now holds a handle on the first 12 MiB
    subprocess.run([sys.executable, "-c", write, str(path), "2000"], check=True)  # resumes: the same file grows
    facts = describe_cache(path)[0]
    assert facts["complete"] and facts["written"] == 2000
    assert torch.equal(CachedImageDataset(path)[1999]["image"], source[1999]["image"])
    subprocess.run([sys.executable, "-c", write, str(path), "30"], check=True)  # another request: a new file
    assert describe_cache(path)[0]["count"] == len(CachedImageDataset(path)) == 30
