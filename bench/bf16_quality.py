"""bf16 autocast against fp32: training speed and held-out bits/dim after a short identical run.

Both runs use the same data (the bundled CIFAR-10 sample), preset, seed, steps and batch order; only
``TrainConfig.precision`` differs. Held-out bits/dim is evaluated in fp32 for both (EMA weights, whole test part of
the sample), so the difference shows what bf16 training cost in model quality, not bf16 evaluation noise.

    python bench/bf16_quality.py                     # small preset, 32x32, 200 steps of batch 8
    python bench/bf16_quality.py --steps 50 --image-size 16 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vqprior.config import DataConfig, TrainConfig, model_config_from_preset
from vqprior.data.loader import load_image_dataset
from vqprior.evaluation.likelihood import evaluate_nll
from vqprior.training.loop import train
from vqprior.training.pixel_task import PixelTask


def run(precision: str, args, train_set, val_set) -> dict:
    model_config = model_config_from_preset(args.preset, height=train_set.height, width=train_set.width)
    task = PixelTask(model_config, DataConfig(dataset="sample", image_size=args.image_size))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, precision=precision, lr=2e-3,
                         eval_every=10 ** 9, sample_every=10 ** 9, checkpoint_every=10 ** 9, num_samples=1)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(task, train_set, None, config, out, progress=False)
        seconds = time.perf_counter() - start
        ckpt = torch.load(Path(out) / "latest.pt", map_location="cpu", weights_only=True)
        times = [json.loads(line)["items_per_s"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in line]
    model = task.build_model().eval()
    model.load_state_dict(ckpt["ema"])
    loader = torch.utils.data.DataLoader(val_set, batch_size=64)
    bpd = evaluate_nll(model, loader)["bits_per_value"]
    return {"precision": precision, "seconds": seconds, "images_per_s": sorted(times)[len(times) // 2], "bpd": bpd}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="Training seed (model init, dropout, batch order).")
    args = parser.parse_args()
    train_set = load_image_dataset("sample", "train", image_size=args.image_size)
    val_set = load_image_dataset("sample", "test", image_size=args.image_size)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}; preset "
          f"{args.preset}, {train_set.height}x{train_set.width}, {args.steps} steps x {args.batch_size}, "
          f"seed {args.seed}")
    rows = [run(p, args, train_set, val_set) for p in ("fp32", "bf16")]
    print("| precision | train wall s | median images/s | held-out bits/dim (fp32 eval) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} | {r['bpd']:.4f} |")
    print(f"bf16 - fp32: {rows[1]['bpd'] - rows[0]['bpd']:+.4f} bits/dim; speed ratio bf16/fp32 "
          f"{rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
