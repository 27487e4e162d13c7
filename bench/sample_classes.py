"""Are class-conditional samples their class, and how varied are they? A judge labels each sample; the table gives,
per guidance scale W (classifier-free guidance, docs/guidance.md), the share read as the class it was drawn for and
three diversity figures, beside the judge's own accuracy on real test images (its ceiling). A user sees the
trade-off, not only the gain.

Judges (bench/judges.py): ``cnn`` (default), a small CNN the bench trains on the train split and caches in
~/.cache/vqprior-judges (MNIST >= 98% test accuracy, a couple of minutes on one thread; CIFAR-10 longer); ``knn``,
the raw-pixel 1-NN of the first figures (assumption-free but weak). Diversity, per requested class then averaged:
the mean pairwise distance between samples of the class in the judge's feature space and in pixels, each divided
by the same figure for real test images of that class (1.00 = as spread out as real data), and the entropy in bits
of the judge's predicted classes (0 when every sample of the class is read as one class).

Samples come from a checkpoint, drawn here at each --guidance scale (sample i for class i % classes, seed fixed per
scale, so W = 0 equals `vqprior sample --seed S`), or from .npy arrays of `vqprior sample --save-array`:

    python bench/sample_classes.py checkpoints/mnist-prior.pt --data-dir ../shared/data/mnist --guidance 0,1,3 \\
        --per-class 50 --grids docs/mnist_prior_guidance
    python bench/sample_classes.py s.npy --dataset mnist --data-dir ../shared/data/mnist --judge knn

--grids PREFIX also writes PREFIX-w{W}.png (one row per class) and PREFIX.png, the scales side by side.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from judges import as_tensors, load_or_train, predict

from vqprior.data.loader import load_image_dataset


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


class Judge:
    """``read(images)`` -> (predicted classes (N,), features (N, F) or None) and ``accuracy`` on real test images."""

    def __init__(self, kind: str, dataset: str, data_dir: str | None, k: int = 1, test_limit: int = 0):
        self.kind, self.k = kind, k
        if kind == "cnn":
            self.net, self.accuracy, self.test_x, self.test_y = load_or_train(dataset, data_dir,
                                                                              log=lambda s: print(s, file=sys.stderr))
            self.what = f"a CNN trained by the bench on {dataset} train (bench/judges.py)"
        else:
            train_x, self.train_y = as_tensors(load_image_dataset(dataset, "train", data_dir=data_dir,
                                                                  progress=False))
            self.train_x = train_x.flatten(1).float() / 255
            self.test_x, self.test_y = as_tensors(load_image_dataset(dataset, "test", data_dir=data_dir,
                                                                     progress=False))
            self.what = f"{k}-NN on raw pixels, fit on {len(train_x)} {dataset} training images"
        if test_limit:
            self.test_x, self.test_y = self.test_x[:test_limit], self.test_y[:test_limit]
        self.classes = int(self.test_y.max()) + 1
        if kind != "cnn":
            self.accuracy = float((self.read(self.test_x)[0] == self.test_y).float().mean())

    def read(self, images: torch.Tensor):
        if self.kind == "cnn":
            probs, feats = predict(self.net, images)
            return probs.argmax(1), feats
        return knn_predict(self.train_x, self.train_y, images.flatten(1).float() / 255, self.k, self.classes), None


def mean_pairwise(x: torch.Tensor) -> float:
    return float(torch.pdist(x.double()).mean()) if len(x) > 1 else float("nan")


def figures(judge: Judge, images: torch.Tensor, wanted: torch.Tensor, real: dict) -> dict:
    """Share read as the wanted class (overall and per class) and the diversity figures (see the docstring)."""
    predicted, feats = judge.read(images)
    hits = predicted == wanted
    per_class, spread_f, spread_p, entropy = [], [], [], []
    for c in range(judge.classes):
        rows = wanted == c
        if not rows.any():
            continue
        per_class.append(float(hits[rows].float().mean()))
        counts = torch.bincount(predicted[rows], minlength=judge.classes).double()
        p = counts[counts > 0] / counts.sum()
        entropy.append(float(-(p * p.log2()).sum()))
        spread_p.append(mean_pairwise(images[rows].flatten(1).float() / 255) / real["pixels"][c])
        if feats is not None:
            spread_f.append(mean_pairwise(feats[rows]) / real["features"][c])
    mean = lambda v: float(np.nanmean(v)) if v else float("nan")  # noqa: E731
    return {"share": float(hits.float().mean()), "per_class": per_class, "features": mean(spread_f),
            "pixels": mean(spread_p), "entropy": mean(entropy), "n": len(images)}


def real_spreads(judge: Judge, per_class: int = 300) -> dict:
    """Mean pairwise distances among real test images of each class (the first ``per_class`` of each)."""
    _, feats = judge.read(judge.test_x)
    out = {"pixels": [], "features": []}
    for c in range(judge.classes):
        rows = (judge.test_y == c).nonzero().flatten()[:per_class]
        out["pixels"].append(mean_pairwise(judge.test_x[rows].flatten(1).float() / 255))
        if feats is not None:
            out["features"].append(mean_pairwise(feats[rows]))
    return out


def draw_samples(args, scale: float) -> torch.Tensor:
    """uint8 (N, C, H, W) samples of the checkpoint at guidance ``scale``, sample i drawn for class i % classes."""
    from vqprior.checkpoint import load_model
    from vqprior.sampling.generate import generate

    model = load_model(args.source, args.device, kind=("pixels", "prior"))
    bottom = load_model(args.bottom, args.device, kind="prior") if args.bottom else None
    num = args.per_class * model.config.num_classes
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return generate(model, num, bottom=bottom, generator=generator, temperature=args.temperature, guidance=scale,
                    batch_size=args.batch_size, progress=None).images.cpu()


def write_grids(prefix: str, grids: list[tuple[float, torch.Tensor]], classes: int, columns: int) -> list[str]:
    """PREFIX-w{W}.png per scale (one row per class, ``columns`` samples each) and PREFIX.png side by side."""
    from PIL import Image, ImageDraw

    from vqprior.images import make_grid, save_image

    panels, written = [], []
    for scale, images in grids:
        by_class = torch.cat([images[c::classes][:columns] for c in range(classes)])
        grid = make_grid(by_class, nrow=columns)
        path = f"{prefix}-w{scale:g}.png"
        save_image(grid, path, scale=2)
        written.append(path)
        panels.append((scale, grid))
    height, caption, gap = max(g.shape[1] for _, g in panels), 14, 8
    width = sum(g.shape[2] for _, g in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + caption), "white")
    x = 0
    for scale, grid in panels:
        canvas.paste(Image.fromarray(grid.expand(3, -1, -1).permute(1, 2, 0).numpy()), (x, caption))
        ImageDraw.Draw(canvas).text((x + 2, 1), f"W = {scale:g}", fill="black")
        x += grid.shape[2] + gap
    side = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()
    save_image(side, f"{prefix}.png", scale=2)
    return written + [f"{prefix}.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a class-conditional checkpoint, or a uint8 (N, C, H, W) .npy")
    parser.add_argument("more", nargs="*", help="more .npy arrays (with a .npy source)")
    parser.add_argument("--bottom", default=None, help="the bottom prior of a 2-level pair")
    parser.add_argument("--dataset", default=None, help="default: the checkpoint's")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--judge", choices=["cnn", "knn"], default="cnn")
    parser.add_argument("--k", type=int, default=1, help="k of the knn judge")
    parser.add_argument("--guidance", default="0,1,3", help="comma-separated scales W (checkpoint source)")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class and scale")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grids", default=None, metavar="PREFIX", help="write class-row grids per scale")
    parser.add_argument("--grid-columns", type=int, default=10)
    parser.add_argument("--test-limit", type=int, default=None,
                        help="real test images judged (0: all; default: all for cnn, 2000 for the slower knn)")
    args = parser.parse_args()

    arrays = args.source.endswith(".npy")
    if arrays and args.grids:
        raise SystemExit("Error: --grids draws from a checkpoint; it does nothing with .npy arrays")
    if not arrays and args.more:
        raise SystemExit("Error: more sources are .npy arrays; a checkpoint is judged alone")
    try:
        scales = [float(w) for w in args.guidance.split(",")]
    except ValueError:
        raise SystemExit(f"Error: --guidance takes comma-separated numbers, got {args.guidance!r}")
    dataset = args.dataset
    if not arrays and dataset is None:
        from vqprior.checkpoint import read_checkpoint

        dataset = read_checkpoint(args.source)["config"]["data"].get("dataset") or "mnist"
    limit = args.test_limit if args.test_limit is not None else (0 if args.judge == "cnn" else 2000)
    judge = Judge(args.judge, dataset or "mnist", args.data_dir, args.k, limit)
    real = real_spreads(judge)
    rows = [("real test images", "-", figures(judge, judge.test_x, judge.test_y, real))]
    grids = []
    if arrays:
        for path in [args.source, *args.more]:
            try:
                samples = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError) as e:
                raise SystemExit(f"Error: cannot read {path} as a .npy array ({e})")
            if samples.dtype != torch.uint8 or samples.dim() != 4 or samples.shape[1:] != judge.test_x.shape[1:]:
                raise SystemExit(f"Error: {path} is not a uint8 (N, C, H, W) array of this dataset's image size")
            rows.append((path, "?", figures(judge, samples, torch.arange(len(samples)) % judge.classes, real)))
    else:
        for scale in scales:
            images = draw_samples(args, scale)
            rows.append((args.source, f"{scale:g}", figures(judge, images, torch.arange(len(images)) % judge.classes,
                                                             real)))
            grids.append((scale, images))
    print(f"judge: {judge.what}; test accuracy {judge.accuracy:.1%} on {len(judge.test_x)} {dataset} test images")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}\n")
    print("| samples | W | n | read as their class | per class 0..9 | spread, judge features | spread, pixels "
          "| predicted-class entropy (bits) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, scale, f in rows:
        per = " ".join(f"{v:.0%}" for v in f["per_class"])
        feat = "-" if math.isnan(f["features"]) else f"{f['features']:.2f}"
        print(f"| {name} | {scale} | {f['n']} | **{f['share']:.1%}** | {per} | {feat} | {f['pixels']:.2f} | "
              f"{f['entropy']:.2f} |")
    print(f"\nspread: mean pairwise distance within a class / the same among real test images of it (1.00 = as "
          f"varied as real data); judge test accuracy {judge.accuracy:.1%} beside every figure above")
    if args.grids:
        Path(args.grids).parent.mkdir(parents=True, exist_ok=True)
        print("grids: " + ", ".join(write_grids(args.grids, grids, judge.classes, args.grid_columns)))


if __name__ == "__main__":
    main()
