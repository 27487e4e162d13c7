"""Datasets and the LMDB image cache: every source layout (tiny fakes in tmp_path), errors, cache reuse/rebuild,
spawned DataLoader workers, the bundled sample and, when present, the real CIFAR-10 in ../shared/data."""
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from vqprior.data import image_cache
from vqprior.data.datasets import ImageDataset
from vqprior.data.image_cache import CachedImageDataset, write_image_cache
from vqprior.data.loader import load_image_dataset
from vqprior.data.mosaic import decode_mosaic_png, encode_mosaic_png
from vqprior.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def shared_cifar_dir():
    for base in (os.environ.get("VQPRIOR_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if base and (Path(base) / "cifar10" / "test.npz").is_file():
            return Path(base) / "cifar10"
    return None


def write_fake_cifar(folder: Path, n_train=70, n_test=9, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        np.savez_compressed(folder / f"{split}.npz", images=images, labels=labels)
        arrays[split] = (images, labels)
    return arrays


def stack(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


# ----------------------------------------------------------------------------------------------- bundled sample
def test_sample_shapes_labels_and_dtypes():
    train, test = load_image_dataset("sample", "train"), load_image_dataset("sample", "test")
    assert (train.channels, train.height, train.width, train.num_classes) == (3, 32, 32, 10)
    assert len(train) >= 2500 and len(test) >= 400
    item = test[len(test) - 1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    assert item["index"].item() == len(test) - 1
    _, labels = stack(test)
    counts = torch.bincount(labels, minlength=10)
    assert (counts == counts[0]).all()  # class-balanced
    images = train.images.float()
    assert 90 < images.mean() < 150 and images.std() > 40  # natural images, not noise or blanks
    small = load_image_dataset("sample", "test", image_size=16, limit=5)
    assert len(small) == 5 and small[4]["image"].shape == (3, 16, 16)
    assert small[-1]["index"].item() == 4
    with pytest.raises(IndexError):
        small[5]


def test_sample_mosaic_helpers_are_lossless_and_balanced():
    labels = np.array([0, 1, 1, 0, 2, 2, 1, 0, 2])
    assert load_script("make_sample").select_class_balanced(labels, 2).tolist() == [0, 1, 2, 3, 4, 5]
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    assert np.array_equal(decode_mosaic_png(encode_mosaic_png(images, columns=3), 7, 5, 4), images)


# ----------------------------------------------------------------------------------------------- cifar10 / mnist
def test_npz_layout_cifar_and_mnist(tmp_path):
    arrays = write_fake_cifar(tmp_path / "cifar10")
    ds = load_image_dataset("cifar10", "test", data_dir=tmp_path / "cifar10")
    images, labels = stack(ds)
    assert torch.equal(images, torch.from_numpy(arrays["test"][0]).permute(0, 3, 1, 2))
    assert labels.tolist() == arrays["test"][1].tolist()
    # one level down (data_dir/cifar10/train.npz), resized, limited
    nested = load_image_dataset("cifar10", "train", data_dir=tmp_path, image_size=16, limit=3)
    assert len(nested) == 3 and nested.height == nested.width == 16
    resized = np.asarray(Image.fromarray(arrays["train"][0][2]).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(nested[2]["image"].permute(1, 2, 0).numpy(), resized)

    (tmp_path / "m").mkdir()
    digits = np.random.default_rng(2).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "m" / "train.npz", images=digits, labels=np.arange(4, dtype=np.uint8))
    mnist = load_image_dataset("mnist", "train", data_dir=tmp_path / "m")
    assert mnist.channels == 1 and mnist[3]["image"].shape == (1, 28, 28) and mnist[3]["label"].item() == 3
    assert torch.equal(mnist[1]["image"][0], torch.from_numpy(digits[1]))
    with pytest.raises(UserError, match="expected uint8 images"):
        load_image_dataset("cifar10", "train", data_dir=tmp_path / "m")  # MNIST arrays are not RGB


def test_torchvision_mnist_raw_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    digits = np.random.default_rng(3).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 3, 28, 28) + digits.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 3) + bytes([7, 1, 4]))
    ds = load_image_dataset("mnist", "test", data_dir=tmp_path)
    assert ds.channels == 1 and [ds[i]["label"].item() for i in range(3)] == [7, 1, 4]
    assert torch.equal(ds[2]["image"][0], torch.from_numpy(digits[2]))


def test_missing_or_empty_data_dir_errors(tmp_path):
    with pytest.raises(UserError, match="train.npz"):
        load_image_dataset("cifar10", "train")
    with pytest.raises(UserError, match="data dir not found"):
        load_image_dataset("mnist", "train", data_dir=tmp_path / "nope")
    with pytest.raises(UserError, match="train.npz / test.npz .*MNIST/raw"):
        load_image_dataset("mnist", "train", data_dir=tmp_path)
    with pytest.raises(UserError, match="unknown dataset"):
        load_image_dataset("svhn", "train", data_dir=tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        load_image_dataset("sample", "valid")


# ----------------------------------------------------------------------------------------------- image folders
def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folder_classes_modes_and_resizing(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[:3] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    save(tmp_path / "cats" / "a.png", Image.fromarray(rgba, "RGBA"))
    save(tmp_path / "cats" / "sub" / "b.png", Image.fromarray(np.full((6, 6), 77, np.uint8), "L"))
    wide = np.full((6, 6), 65535, np.uint16)
    wide[:, 3:] = 0
    save(tmp_path / "dogs" / "c.png", Image.fromarray(wide))  # mode I;16
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    save(tmp_path / "dogs" / "d.gif", palette)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "test").mkdir()
    save(tmp_path / "test" / "dogs" / "e.jpg", Image.new("RGB", (8, 12), (0, 0, 255)))

    train = load_image_dataset("folder", "train", data_dir=tmp_path)
    assert (len(train), train.num_classes, train.channels, train.height) == (4, 2, 3, 6)
    assert [train[i]["label"].item() for i in range(4)] == [0, 0, 1, 1]
    a, b, c, d = (train[i]["image"] for i in range(4))
    assert a[:, 0, 0].tolist() == [255, 0, 0] and a[:, 5, 5].tolist() == [255, 255, 255]  # alpha over white
    assert b[:, 2, 2].tolist() == [77, 77, 77]
    assert c[:, 0, 0].tolist() == [255] * 3 and c[:, 0, 5].tolist() == [0] * 3  # 16-bit scaled to 8
    assert d[:, 3, 3].tolist() == [10, 200, 30]
    test = load_image_dataset("folder", "test", data_dir=tmp_path, image_size=4)
    assert len(test) == 1 and test.num_classes == 2 and test[0]["label"].item() == 1
    assert test[0]["image"].shape == (3, 4, 4) and test[0]["image"][2].min() > 200
    save(tmp_path / "cats" / "big.png", Image.new("RGB", (9, 7)))
    with pytest.raises(UserError, match="differ in size.*pass --image-size"):
        load_image_dataset("folder", "train", data_dir=tmp_path)
    assert load_image_dataset("folder", "train", data_dir=tmp_path, image_size=5)[0]["image"].shape == (3, 5, 5)


def test_folder_holdout_is_deterministic_and_disjoint(tmp_path):
    for i in range(25):
        save(tmp_path / f"img{i:02d}.png", Image.new("RGB", (4, 4), (i, 0, 0)))
    train = load_image_dataset("folder", "train", data_dir=tmp_path)
    test = load_image_dataset("folder", "test", data_dir=tmp_path)
    train_values = {train[i]["image"][0, 0, 0].item() for i in range(len(train))}
    test_values = {test[i]["image"][0, 0, 0].item() for i in range(len(test))}
    assert train.num_classes == 0 and len(test) == 2 and not train_values & test_values
    assert train_values | test_values == set(range(25))
    assert test_values == {test[i]["image"][0, 0, 0].item()
                           for i in range(len(load_image_dataset("folder", "test", data_dir=tmp_path)))}


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        load_image_dataset("folder", "train", data_dir=tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="none ending in"):
        load_image_dataset("folder", "train", data_dir=tmp_path / "text")
    bad = tmp_path / "bad"  # two files: the 5 % hold-out takes a_good.png, training keeps z_broken.png
    save(bad / "a_good.png", Image.new("RGB", (4, 4)))
    (bad / "z_broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        load_image_dataset("folder", "train", data_dir=bad)
    ds = load_image_dataset("folder", "train", data_dir=bad, image_size=4)  # no header scan when resizing
    with pytest.raises(UserError, match="broken.png"):
        stack(ds)


# ----------------------------------------------------------------------------------------------- downsampled ImageNet
def test_imagenet_png_folders(tmp_path):
    rng = np.random.default_rng(4)
    written = {}
    for folder, n in (("train_32x32", 3), ("valid_32x32", 2)):
        written[folder] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        for i, array in enumerate(written[folder]):
            save(tmp_path / folder / f"{i:05d}.png", Image.fromarray(array))
    test = load_image_dataset("imagenet32", "test", data_dir=tmp_path)
    images, labels = stack(test)
    assert test.num_classes == 0 and labels.tolist() == [0, 0]
    assert torch.equal(images, torch.from_numpy(written["valid_32x32"]).permute(0, 3, 1, 2))
    assert len(load_image_dataset("imagenet32", "train", data_dir=tmp_path)) == 3
    with pytest.raises(UserError, match="train_64x64"):
        load_image_dataset("imagenet64", "train", data_dir=tmp_path)


def test_imagenet_npz_batches(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    batches = []
    for b, n in ((1, 3), (2, 2), (10, 4)):  # batch 10 must come after batch 2
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        save_npz = np.savez_compressed if b == 1 else np.savez  # deflated and memory-mapped members
        save_npz(folder / f"train_data_batch_{b}.npz", data=data, labels=labels, mean=np.zeros(3))
        batches.append((data, labels))
    np.savez(tmp_path / "val_data.npz", data=batches[0][0][:1], labels=np.array([1000]))
    train = load_image_dataset("imagenet32", "train", data_dir=tmp_path)
    assert (len(train), train.num_classes) == (9, 1000)
    images, labels = stack(train)
    all_data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(all_data))
    assert labels.tolist() == (np.concatenate([l for _, l in batches]) - 1).tolist()
    test = load_image_dataset("imagenet32", "test", data_dir=tmp_path, image_size=8)
    assert test[0]["label"].item() == 999 and test[0]["image"].shape == (3, 8, 8)
    with pytest.raises(UserError, match="not .*64x64"):
        load_image_dataset("imagenet64", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- LMDB image cache
class Interrupted(ImageDataset):
    """Reads like ``inner`` but fails at item ``after``, as a crash or Ctrl-C during a cache build would."""

    def __init__(self, inner, after):
        super().__init__(inner.name, inner.split, len(inner), inner.channels, inner.height, inner.width,
                         inner.num_classes)
        self.inner, self.after = inner, after

    def read_array(self, index):
        if index == self.after:
            raise RuntimeError("interrupted")
        return self.inner.read_array(index)


def test_cache_round_trip_reuse_and_rebuild(tmp_path):
    write_fake_cifar(tmp_path / "c")
    plain = load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16)
    cached = load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16, cache=tmp_path / "k")
    assert isinstance(cached, CachedImageDataset) and cached.height == 16 and cached.num_classes == 10
    expected = stack(plain)
    assert all(torch.equal(x, y) for x, y in zip(stack(cached), expected))
    envs = sorted(p.name for p in (tmp_path / "k").glob("*.lmdb"))
    assert len(envs) == 1

    shutil.move(tmp_path / "c", tmp_path / "moved")  # the source is gone: only the cache can answer now
    again = load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16, cache=tmp_path / "k")
    assert all(torch.equal(x, y) for x, y in zip(stack(again), expected))
    limited = load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16, cache=tmp_path / "k",
                                 limit=5)  # served by the full cache, no new environment
    assert len(limited) == 5 and torch.equal(limited[4]["image"], expected[0][4])
    assert sorted(p.name for p in (tmp_path / "k").glob("*.lmdb")) == envs

    with pytest.raises(RuntimeError, match="interrupted"):  # a build that dies half-way over the same cache
        write_image_cache(Interrupted(plain, after=30), tmp_path / "k" / envs[0])
    assert (tmp_path / "k" / envs[0] / "data.mdb").is_file()
    assert image_cache.read_cache_metadata(tmp_path / "k" / envs[0]) is None
    with pytest.raises(UserError, match="data dir not found"):  # unfinished: must rebuild, and the source is gone
        load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16, cache=tmp_path / "k")
    shutil.move(tmp_path / "moved", tmp_path / "c")
    rebuilt = load_image_dataset("cifar10", "train", data_dir=tmp_path / "c", image_size=16, cache=tmp_path / "k")
    assert all(torch.equal(x, y) for x, y in zip(stack(rebuilt), expected))
    assert image_cache.read_cache_metadata(tmp_path / "k" / envs[0])["count"] == 70


def test_cache_limit_only_caches_prefix_and_map_grows(tmp_path):
    sample = load_image_dataset("sample", "test", cache=tmp_path, limit=7)
    assert len(sample) == 7 and image_cache.read_cache_metadata(next(tmp_path.glob("*first7.lmdb")))["count"] == 7
    source = load_image_dataset("sample", "test", limit=150)
    write_image_cache(source, tmp_path / "small.lmdb", map_size=64 * 1024)  # far too small: must grow
    cached = CachedImageDataset(tmp_path / "small.lmdb")
    assert all(torch.equal(x, y) for x, y in zip(stack(cached), stack(source)))
    with pytest.raises(UserError, match="not a complete"):
        CachedImageDataset(tmp_path / "missing.lmdb")


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_cache_read_by_dataloader_workers(tmp_path, context):
    cached = load_image_dataset("sample", "test", image_size=8, cache=tmp_path, limit=40)
    cached[0]  # open the environment here first: spawned workers must not receive it, forked ones must not reuse it
    loader = torch.utils.data.DataLoader(cached, batch_size=8, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(40))
    assert torch.equal(images, stack(load_image_dataset("sample", "test", image_size=8, limit=40))[0])


# ----------------------------------------------------------------------------------------------- real CIFAR-10
def test_real_cifar10_and_sample_provenance():
    folder = shared_cifar_dir()
    if folder is None:
        pytest.skip("real CIFAR-10 not present (set VQPRIOR_SHARED_DATA)")
    test = load_image_dataset("cifar10", "test", data_dir=folder)
    assert len(test) == 10000 and test.num_classes == 10
    # the first test labels of the original test_batch, as documented in shared/data/README.md
    assert [test[i]["label"].item() for i in range(10)] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    with np.load(image_cache.__file__.replace("image_cache.py", "sample/cifar10_sample.npz")) as z:
        indices = z["test_indices"]
    sample = load_image_dataset("sample", "test")
    for position in (0, len(sample) // 2, len(sample) - 1):  # the bundled sample is pixel-exact CIFAR-10
        assert torch.equal(sample[position]["image"], test[int(indices[position])]["image"])
        assert sample[position]["label"] == test[int(indices[position])]["label"]
