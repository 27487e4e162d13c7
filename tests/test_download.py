"""--download: torchvision's own dataset classes fetch and check the archive from its URL (here a local HTTP server
serving tiny archives in the real formats), each split is converted once to train.npz / test.npz, and every later
run reads those, with no network. A corrupt archive is a one-line error."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd

from cli_support import check_ok, run_cli
from conftest import REPO
from vqprior.data.loader import load_image_dataset
from vqprior.errors import UserError


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over a folder; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _cifar_archive(monkeypatch, root: Path, url: str, rng) -> dict[str, np.ndarray]:
    """cifar-10-python.tar.gz as the real one is laid out (pickled batches of CHW-flattened rows), 2 images per
    batch; CIFAR10's URL and checksums pointed at it. Returns the images (N, 32, 32, 3) per split."""
    batches, images = {}, {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = pickle.dumps({"data": data, "labels": [int(x) for x in rng.integers(0, 10, 2)]})
        images["test" if name == "test_batch" else "train"].append(data.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    batches["batches.meta"] = pickle.dumps({"label_names": [f"class{i}" for i in range(10)]})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (root / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    monkeypatch.setattr(tvd.CIFAR10, "url", url + "cifar-10-python.tar.gz")
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", _md5(buffer.getvalue()))
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", _md5(batches[f"data_batch_{i}"])]
                                                    for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", _md5(batches["test_batch"])]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": _md5(batches["batches.meta"])})
    return {split: np.concatenate(parts) for split, parts in images.items()}


def _mnist_archive(monkeypatch, root: Path, url: str, rng) -> dict[str, np.ndarray]:
    """The four gzipped idx files of MNIST, 3 train and 2 test images; MNIST's mirrors and checksums pointed at
    them. Returns the images (N, 28, 28) per split."""
    resources, images = [], {}
    for prefix, split, n in (("train", "train", 3), ("t10k", "test", 2)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images[split] = pixels
        for kind, body in (("images-idx3", struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes()),
                           ("labels-idx1", struct.pack(">II", 2049, n) + labels.tobytes())):
            name = f"{prefix}-{kind}-ubyte.gz"
            blob = gzip.compress(body)
            (root / name).write_bytes(blob)
            resources.append((name, _md5(blob)))
    monkeypatch.setattr(tvd.MNIST, "mirrors", [url])
    monkeypatch.setattr(tvd.MNIST, "resources", resources)
    return images


@pytest.mark.parametrize("name, make, channels", [("cifar10", _cifar_archive, 3), ("mnist", _mnist_archive, 1)])
def test_download_converts_once_and_later_runs_read_the_npz(server, tmp_path, monkeypatch, name, make, channels):
    served, url = server
    expected = make(monkeypatch, served, url, np.random.default_rng(0))
    data = tmp_path / "data"
    for split in ("train", "test"):
        ds = load_image_dataset(name, split, data_dir=data, download=True)
        got = np.stack([ds[i]["image"].numpy() for i in range(len(ds))]).transpose(0, 2, 3, 1)
        assert np.array_equal(got.reshape(expected[split].shape), expected[split])
        assert (data / f"{split}.npz").is_file()
    for archive in served.iterdir():
        archive.unlink()  # no network from here on: the npz files are what later runs read
    again = load_image_dataset(name, "train", data_dir=data)
    assert len(again) == len(expected["train"]) and again[0]["image"].shape[0] == channels


def test_evaluate_downloads_what_it_scores(server, tmp_path, monkeypatch):
    served, url = server
    _cifar_archive(monkeypatch, served, url, np.random.default_rng(1))
    result = check_ok(run_cli("evaluate", REPO / "checkpoints" / "cifar10-pixels-small.pt", "--dataset", "cifar10",
                              "--data-dir", tmp_path / "cifar", "--download", "--limit", "2", "--quiet",
                              "--device", "cpu"))
    assert "bits/dim" in result.output
    assert (tmp_path / "cifar" / "test.npz").is_file()


def test_a_corrupt_archive_is_a_one_line_error_and_converts_nothing(server, tmp_path, monkeypatch):
    served, url = server
    _cifar_archive(monkeypatch, served, url, np.random.default_rng(2))
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(UserError, match="could not download cifar10"):
        load_image_dataset("cifar10", "train", data_dir=tmp_path / "data", download=True)
    assert not (tmp_path / "data" / "train.npz").exists()
