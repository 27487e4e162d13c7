"""Are class-conditional samples recognisably their class? A k-nearest-neighbour classifier on raw pixels, fit on
the training split, labels each sample; the table gives the share labelled with the class it was drawn for, per
class and overall, beside the same classifier's accuracy on real test images (its own ceiling) and on images of
uniform noise (its floor). Raw-pixel k-NN is a weak, assumption-free judge: it knows nothing of our models.

Samples come from ``vqprior sample --save-array``, whose sample i is drawn for class i % classes:

    vqprior sample checkpoints/mnist-pixels-conditional.pt --num 100 --seed 0 --save-array s.npy
    python bench/sample_classes.py s.npy --dataset mnist --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from vqprior.data.datasets import load_image_dataset


def as_matrix(dataset, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C*H*W) float32 pixels in [0, 1] and (N,) labels of an ImageDataset."""
    n = min(len(dataset), limit) if limit else len(dataset)
    if getattr(dataset, "images", None) is not None and not dataset.image_size:  # in memory (N, H, W, C): no copying
        images = dataset.images[:n].permute(0, 3, 1, 2).flatten(1).float() / 255
        return images, dataset.labels[:n]
    items = [dataset[i] for i in range(n)]
    images = torch.stack([torch.as_tensor(item["image"]) for item in items]).flatten(1).float() / 255
    return images, torch.tensor([int(item["label"]) for item in items])


def knn_predict(train_x, train_y, x, k: int, classes: int, chunk: int = 500) -> torch.Tensor:
    """Majority label of the k nearest training images (Euclidean), ties to the nearest neighbour's label."""
    predictions = []
    for part in x.split(chunk):
        nearest = torch.cdist(part, train_x).topk(k, largest=False).indices  # (n, k), nearest first
        labels = train_y[nearest]
        votes = torch.zeros(len(part), classes).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float))
        # a tie between classes goes to the class of the nearest neighbour among the tied ones
        top = votes.max(1, keepdim=True).values
        tied = votes.gather(1, labels) == top.expand_as(labels)
        predictions.append(labels.gather(1, tied.float().argmax(1, keepdim=True)).squeeze(1))
    return torch.cat(predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="uint8 (N, C, H, W) .npy from `vqprior sample --save-array`")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--test-limit", type=int, default=2000, help="real test images scored for the ceiling")
    args = parser.parse_args()

    torch.manual_seed(0)
    train_x, train_y = as_matrix(load_image_dataset(args.dataset, "train", data_dir=args.data_dir, progress=False))
    test_set = load_image_dataset(args.dataset, "test", data_dir=args.data_dir, progress=False)
    classes = test_set.num_classes
    if not classes:
        raise SystemExit(f"Error: {args.dataset} has no class labels to judge samples by")
    test_x, test_y = as_matrix(test_set, args.test_limit)
    try:
        samples = np.load(args.samples, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"Error: cannot read {args.samples} as a .npy array ({e})")
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples[0].size != train_x.shape[1]:
        raise SystemExit(f"Error: {args.samples} is not a uint8 (N, C, H, W) array of this dataset's image size")
    sample_x = torch.from_numpy(samples).flatten(1).float() / 255
    sample_y = torch.arange(len(samples)) % classes
    noise_x = torch.rand(len(samples), train_x.shape[1])

    hits = knn_predict(train_x, train_y, sample_x, args.k, classes) == sample_y
    test_acc = float((knn_predict(train_x, train_y, test_x, args.k, classes) == test_y).float().mean())
    noise_acc = float((knn_predict(train_x, train_y, noise_x, args.k, classes) == sample_y).float().mean())
    print(f"{args.k}-NN on raw pixels, fit on {len(train_x)} {args.dataset} training images")
    print(f"samples: {args.samples} ({len(samples)}; sample i drawn for class i % {classes})\n")
    print("| class | " + " | ".join(str(c) for c in range(classes)) + " | all |")
    print("|---" * (classes + 2) + "|")
    per_class = [f"{float(hits[sample_y == c].float().mean()):.0%}" for c in range(classes)]
    print(f"| samples labelled their class | {' | '.join(per_class)} | **{float(hits.float().mean()):.1%}** |")
    print(f"\nsame classifier on the first {len(test_x)} real test images: {test_acc:.1%}; "
          f"on uniform noise against the same class list: {noise_acc:.1%}")


if __name__ == "__main__":
    main()
