"""The LMDB image cache at 256x256: build speed (images/s), bytes per image and read speed for raw, PNG and JPEG
records, and an interrupted build resumed (docs/vqvae2-256.md, "The image cache").

The source is a folder of 256x256 JPEG files (quality 95) written first, untimed, into ``--work`` (outside the
repository; it is deleted at the end unless ``--keep``). Two kinds of picture bracket real photographs, since the
bytes per image depend on the content: ``mosaic`` tiles 8x8 bundled CIFAR-10 photos (the pixel-level detail of
32x32 photos: harder to compress than a real 256x256 photo) and ``upscaled`` enlarges one bundled photo bicubically
(smoother than a real photo).

How each number is measured:

* **build**: ``load_image_dataset("folder", ..., image_size=256, cache=..., cache_encoding=...)`` from nothing to a
  complete cache: scanning the folder, decoding each source JPEG, encoding the record (PNG compress level 6, JPEG
  at ``--jpeg-quality``) on the cache's 4 writer threads, LMDB writes. images/s = images / wall seconds.
* **bytes/image**: the environment's pages in use (``vqprior info``'s figure) / images.
* **read**: one shuffled epoch of a ``DataLoader`` (batch 16) over the finished cache with 0 and 2 worker
  processes (encoded records are decoded in the workers), images/s. Compare with the VQ-VAE's training speed
  (``bench/peer_256.py``'s vqvae row: ours 10.6 images/s at 256x256 on this machine's 2 cores).
* **resume** (``--resume-test``): the JPEG build of the ``--count`` images runs in a subprocess that is sent SIGINT
  once ``--interrupt-at`` images are committed; the build is then run again and must read only the rest; the
  resumed cache's images must equal those of an uninterrupted build's (checked on every 97th image).

Usage (run it on an idle machine):
    python bench/image_cache.py --count 1000                      # the table
    python bench/image_cache.py --count 10000 --kinds mosaic --encodings jpeg --resume-test --interrupt-at 4000
    python bench/image_cache.py --count 10000 --kinds mosaic --encodings "" --resume-test   # the resume test alone
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    from machine import cpu_name

    return cpu_name()


def write_source(folder: Path, count: int, kind: str) -> None:
    from PIL import Image

    from vqprior.data.loader import load_image_dataset

    sample = load_image_dataset("sample", "train")
    folder.mkdir(parents=True, exist_ok=True)
    n = len(sample)
    for i in range(count):
        if kind == "mosaic":
            tiles = [sample.read_array((64 * i + t) % n)[0].transpose(1, 2, 0) for t in range(64)]
            picture = np.concatenate([np.concatenate(tiles[r * 8:(r + 1) * 8], 1) for r in range(8)], 0)
            image = Image.fromarray(picture)
        else:
            image = Image.fromarray(sample.read_array(i % n)[0].transpose(1, 2, 0)).resize((256, 256),
                                                                                           Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=95)


def build(source: Path, cache: Path, encoding: str, quality: int):
    from vqprior.data.loader import load_image_dataset

    start = time.perf_counter()
    dataset = load_image_dataset("folder", "train", data_dir=source, image_size=256, cache=cache,
                                 cache_encoding=encoding, jpeg_quality=quality, progress=False)
    return dataset, time.perf_counter() - start


def read_speed(dataset, workers: int, limit: int) -> float:
    import torch

    subset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(subset, batch_size=16, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(batch["image"]) for batch in loader)
    return count / (time.perf_counter() - start)


def resume_test(source: Path, cache: Path, quality: int, interrupt_at: int) -> None:
    from vqprior.data.cache_info import describe_cache

    child = [sys.executable, __file__, "--build-only", str(source), str(cache), "--jpeg-quality", str(quality)]
    proc = subprocess.Popen(child)
    written = 0
    while proc.poll() is None:
        envs = list(cache.glob("*.lmdb")) if cache.exists() else []
        try:
            written = describe_cache(envs[0])[0]["written"] if envs else 0
        except Exception as e:  # the environment is being created: look again
            print(f"(monitor: {type(e).__name__}: {str(e)[:100]})", file=sys.stderr)
            written = 0
        if written >= interrupt_at:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    proc.wait()
    facts = describe_cache(next(cache.glob("*.lmdb")))[0]
    print(f"interrupted: {facts['written']:,} of {facts['count']:,} images committed, complete={facts['complete']}")
    dataset, seconds = build(source, cache, "jpeg", quality)
    rest = facts["count"] - facts["written"]
    print(f"resumed: {rest:,} remaining images in {seconds:.1f} s ({rest / seconds:.0f} images/s); "
          f"complete={describe_cache(next(cache.glob('*.lmdb')))[0]['complete']}, {len(dataset):,} images")
    whole, _ = build(source, cache.with_name(cache.name + "-whole"), "jpeg", quality)
    same = all(np.array_equal(dataset.read_array(i)[0], whole.read_array(i)[0]) for i in range(0, len(whole), 97))
    print(f"resumed cache equals an uninterrupted build (every 97th image): {same}")


def main(args) -> None:
    import torch

    from vqprior.data.cache_info import describe_cache

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    print(f"# bench/image_cache.py on {machine()}, {os.cpu_count()} CPUs; "
          f"{args.count} images of 256x256; {args.threads} torch threads")
    print(f"# command: python bench/image_cache.py {' '.join(sys.argv[1:])}")
    print("| pictures | records | build images/s | KiB/image | read images/s, 0 workers | read images/s, 2 workers |")
    print("|---|---|---|---|---|---|")
    try:
        for kind in args.kinds.split(","):
            source = work / f"source-{kind}-{args.count}"
            if not source.is_dir():
                write_source(source, args.count, kind)
            for encoding in args.encodings.split(",") if args.encodings else []:
                cache = work / f"cache-{kind}-{encoding}"
                shutil.rmtree(cache, ignore_errors=True)
                dataset, seconds = build(source, cache, encoding, args.jpeg_quality)
                facts = describe_cache(next(cache.glob("*.lmdb")))[0]
                name = f"jpeg q{args.jpeg_quality}" if encoding == "jpeg" else encoding
                print(f"| {kind} | {name} | {len(dataset) / seconds:.0f} | {facts['bytes_per_item'] / 1024:.1f} | "
                      f"{read_speed(dataset, 0, args.read_limit):.0f} | "
                      f"{read_speed(dataset, 2, args.read_limit):.0f} |", flush=True)
                dataset.close()
                shutil.rmtree(cache)
            if args.resume_test:
                resume_test(source, work / f"resume-{kind}", args.jpeg_quality, args.interrupt_at)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="images in the source folder")
    p.add_argument("--kinds", default="mosaic,upscaled")
    p.add_argument("--encodings", default="raw,png,jpeg")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--read-limit", type=int, default=1000, help="images read per read-speed figure")
    p.add_argument("--resume-test", action="store_true")
    p.add_argument("--interrupt-at", type=int, default=4000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", default="/tmp/vqprior-image-cache-bench", help="scratch folder outside the repository")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--build-only", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build_only:
        try:
            build(Path(args.build_only[0]), Path(args.build_only[1]), "jpeg", args.jpeg_quality)
        except KeyboardInterrupt:
            sys.exit(130)
    else:
        main(args)
