"""Judges for class-conditional samples: small CNN classifiers the bench trains itself (MNIST, CIFAR-10), cached
outside the repository so that later runs are cheap, plus the raw-pixel k-NN the first figures used.

A judge is trained on the dataset's train split with a fixed seed and recipe, scored on the whole test split (its
accuracy is printed beside every figure it gives), and cached in ``$VQPRIOR_JUDGES`` (default
``~/.cache/vqprior-judges``) as plain tensors and numbers (``torch.load(weights_only=True)``), under a name that
holds the recipe version and a sha256 of the training data, so other data or another recipe never reuse a judge.

    python bench/judges.py --dataset mnist --data-dir ../shared/data/mnist      # train (or load) and score it
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqprior.data.loader import load_image_dataset
from vqprior.io import atomic_write, torch_save_file

RECIPE = 1  # bump when the network or the training recipe changes: cached judges of other recipes are not reused
EPOCHS = {"mnist": 3, "cifar10": 12}  # MNIST: >= 98% test accuracy; CIFAR-10: what a few CPU minutes buy


class JudgeNet(nn.Module):
    """Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max pool) of widths w, 2w, 4w, then global average
    pooling and a linear layer. ``features`` (the pooled 4w vector) is what the diversity figure compares."""

    def __init__(self, channels: int, classes: int, width: int):
        super().__init__()
        layers, c = [], channels
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N, 4w) features."""
        return self.body(x.float() / 127.5 - 1.0).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


WIDTH = {"mnist": 16, "cifar10": 32}


def as_tensors(dataset, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and (N,) int64 labels of an ImageDataset (its first ``limit`` when given)."""
    n = min(len(dataset), limit) if limit else len(dataset)
    if getattr(dataset, "images", None) is not None and not dataset.image_size:  # in memory (N, H, W, C)
        return dataset.images[:n].permute(0, 3, 1, 2).contiguous(), dataset.labels[:n].long()
    items = [dataset[i] for i in range(n)]
    return (torch.stack([torch.as_tensor(item["image"]) for item in items]),
            torch.tensor([int(item["label"]) for item in items]))


def _augment(x: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padded) and, for natural images, horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()  # one shift per batch: cheap, enough here
    x = padded[:, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


def train_judge(dataset: str, images: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int,
                log=print) -> JudgeNet:
    """Adam with a one-cycle learning rate, batch 128, shifts (and flips for CIFAR-10), seed 0."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = JudgeNet(images.shape[1], classes, WIDTH.get(dataset, 32))
    steps_per_epoch = -(-len(images) // 128)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    for epoch in range(epochs):
        order, start = torch.randperm(len(images), generator=g), time.time()
        for i in range(steps_per_epoch):
            idx = order[i * 128:(i + 1) * 128]
            x = _augment(images[idx], flip=dataset == "cifar10", generator=g)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"judge epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    return net.eval()


@torch.no_grad()
def predict(net: JudgeNet, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, classes) probabilities and (N, F) features of uint8 images."""
    probs, feats = [], []
    for part in images.split(batch):
        f = net.features(part)
        feats.append(f)
        probs.append(torch.softmax(net.fc(f), 1))
    return torch.cat(probs), torch.cat(feats)


def cache_dir() -> Path:
    return Path(os.environ.get("VQPRIOR_JUDGES") or Path.home() / ".cache" / "vqprior-judges")


def load_or_train(dataset: str, data_dir: str | None, epochs: int | None = None, log=print):
    """(judge, test accuracy, test images, test labels): the cached judge of this dataset, data and recipe, or a
    newly trained one (then cached)."""
    train_set = load_image_dataset(dataset, "train", data_dir=data_dir, progress=False)
    test_set = load_image_dataset(dataset, "test", data_dir=data_dir, progress=False)
    if not train_set.num_classes:
        raise SystemExit(f"Error: {dataset} has no class labels to train a judge on")
    images, labels = as_tensors(train_set)
    test_x, test_y = as_tensors(test_set)
    epochs = epochs or EPOCHS.get(dataset, 10)
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir() / f"{dataset}-r{RECIPE}-e{epochs}-{digest}.pt"
    net = JudgeNet(images.shape[1], train_set.num_classes, WIDTH.get(dataset, 32))
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(stored["weights"])
        net.eval()
        log(f"judge: {path} (test accuracy {stored['test_accuracy']:.2%})")
        return net, float(stored["test_accuracy"]), test_x, test_y
    log(f"judge: training a CNN on {len(images)} {dataset} images for {epochs} epochs (cached in {path})")
    net = train_judge(dataset, images, labels, train_set.num_classes, epochs, log)
    accuracy = float((predict(net, test_x)[0].argmax(1) == test_y).float().mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch_save_file({"weights": net.state_dict(), "test_accuracy": accuracy,
                                                    "dataset": dataset, "epochs": epochs, "recipe": RECIPE}, tmp))
    log(f"judge: test accuracy {accuracy:.2%} on all {len(test_x)} {dataset} test images")
    return net, accuracy, test_x, test_y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: 3 for MNIST, 12 for CIFAR-10")
    args = parser.parse_args()
    _, accuracy, test_x, _ = load_or_train(args.dataset, args.data_dir, args.epochs)
    print(f"{args.dataset} judge: {accuracy:.2%} test accuracy ({len(test_x)} test images), torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
