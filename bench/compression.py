"""Lossless compression benchmark: our model-coded files against PNG, WebP lossless and JPEG-XL lossless.

    python bench/compression.py [--num 1000] [--model checkpoints/cifar10-pixels-small.pt]
                                [--mnist-model checkpoints/mnist-pixels.pt]

On the first --num test images of CIFAR-10 and MNIST (``/work/shared/data/{cifar10,mnist}/test.npz``, skipped when
absent) it prints a markdown table: bits/dim of the coded bytes (every byte a codec writes, headers included),
encode and decode images/s, and whether the round trip was exact (each codec's output is decoded and compared).
PNG is Pillow at compress_level 9 with optimize; WebP and JPEG-XL come from imagecodecs (``pip install
'vqprior[bench]'``) at their slowest, strongest lossless settings; grayscale goes to WebP as RGB (it has no gray
mode). Those are one file per image; ours is one file for all images (one header). Our rows need a pixel model
for the dataset (the shipped ones by default). Run with one thread and at low priority:
``nice -n 15 env OMP_NUM_THREADS=1 python bench/compression.py``.
"""
from __future__ import annotations

import argparse
import io
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")


def load(path: Path, num: int) -> np.ndarray:
    """uint8 (N, C, H, W) from an npz with ``images`` (N, H, W, C) or (N, H, W)."""
    with np.load(path) as d:
        x = d["images"][:num]
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def hwc(image: np.ndarray) -> np.ndarray:
    return image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))


def png_codec():
    from PIL import Image

    def enc(im):
        buf = io.BytesIO()
        Image.fromarray(hwc(im)).save(buf, format="PNG", optimize=True, compress_level=9)
        return buf.getvalue()

    return enc, lambda data: np.asarray(Image.open(io.BytesIO(data)))


def imagecodecs_codecs():
    try:
        import imagecodecs as ic
    except ImportError:
        return {}
    out = {}
    if ic.WEBP.available:
        def webp_enc(im):
            a = hwc(im)
            return ic.webp_encode(np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a, level=100, lossless=True,
                                  method=6)

        out["WebP lossless (imagecodecs, level 100, method 6)"] = (webp_enc, ic.webp_decode)
    if ic.JPEGXL.available:
        out["JPEG-XL lossless (imagecodecs, effort 9)"] = (
            lambda im: ic.jpegxl_encode(hwc(im), lossless=True, effort=9), ic.jpegxl_decode)
    return out


def same(decoded, image: np.ndarray) -> bool:
    """A decoded (H, W) / (H, W, 3) array equals the (C, H, W) image: gray sent as RGB must come back with three
    equal channels; an RGB image whose channels are all equal may come back as one gray plane."""
    d, want = np.asarray(decoded), hwc(image)
    if d.ndim == 3 and want.ndim == 2:
        return all(np.array_equal(d[..., k], want) for k in range(3))
    if d.ndim == 2 and want.ndim == 3:
        return all(np.array_equal(d, want[..., k]) for k in range(3))
    return np.array_equal(d, want)


def per_image(name, enc, dec, images) -> dict:
    t0 = time.perf_counter()
    files = [enc(im) for im in images]
    t1 = time.perf_counter()
    back = [dec(f) for f in files]
    t2 = time.perf_counter()
    exact = all(same(b, im) for b, im in zip(back, images))
    n = len(images)
    return {"codec": name, "bytes": sum(map(len, files)), "enc": n / (t1 - t0), "dec": n / (t2 - t1),
            "exact": exact, "container": "one file per image"}


def ours(checkpoint: Path, images: np.ndarray, chunk: int) -> list[dict]:
    from vqprior.checkpoint import load_model
    from vqprior.compress import compress_images, decompress_images

    model = load_model(checkpoint, "cpu", kind="pixels")
    x = torch.from_numpy(images)
    t0 = time.perf_counter()
    data, stats = compress_images(model, x, chunk=chunk)
    t1 = time.perf_counter()
    back, _ = decompress_images(model, data)
    t2 = time.perf_counter()
    n = len(images)
    name = f"vqprior compress ({checkpoint.name}, batch {chunk})"
    return [{"codec": "model -log2 p(x) (ideal code length)", "bytes": stats["model_bits"] / 8, "enc": None,
             "dec": None, "exact": None, "container": "-"},
            {"codec": name, "bytes": len(data), "enc": n / (t1 - t0), "dec": n / (t2 - t1),
             "exact": bool(torch.equal(back, x)), "container": f"one file, {stats['header_bytes']} B header"}]


def lossy(top: Path, bottom: Path, images: np.ndarray, chunk: int) -> dict:
    """The learned lossy codec: images -> VQ-VAE codes (top, bottom) -> bits with the priors; PSNR of the
    reconstruction the decoded codes give."""
    from vqprior.checkpoint import load_model
    from vqprior.compress import compress_codes, decompress_codes
    from vqprior.evaluation.metrics import psnr_from_mse

    priors = [load_model(top, "cpu", kind="prior"), load_model(bottom, "cpu", kind="prior")]
    vq, x = priors[0].vqvae, torch.from_numpy(images)
    t0 = time.perf_counter()
    codes = [torch.cat(c) for c in zip(*(vq.encode(x[i:i + 100]) for i in range(0, len(x), 100)))]
    data, stats = compress_codes(priors, codes, chunk=chunk)
    t1 = time.perf_counter()
    back = decompress_codes(priors, data)
    recon = torch.cat([vq.decode([c[i:i + 100] for c in back]) for i in range(0, len(x), 100)])
    t2 = time.perf_counter()
    mse = float(((recon.double() - x.double()) ** 2).mean())
    return {"bpp": 8 * len(data) / (x.shape[0] * x.shape[2] * x.shape[3]), "bytes": len(data) / len(x),
            "psnr": psnr_from_mse(mse), "enc": len(x) / (t1 - t0), "dec": len(x) / (t2 - t1),
            "exact": all(torch.equal(a, b) for a, b in zip(back, codes)), "header": stats["header_bytes"]}


def machine() -> str:
    from machine import cpu_name

    cpu = cpu_name()
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=1000, help="first N test images of each dataset")
    ap.add_argument("--model", type=Path, default=REPO / "checkpoints" / "cifar10-pixels-small.pt")
    ap.add_argument("--mnist-model", type=Path, default=REPO / "checkpoints" / "mnist-pixels.pt",
                    help="a 1-channel 28x28 pixel model")
    ap.add_argument("--batch-size", type=int, default=100, help="images per cached pass of our coder")
    ap.add_argument("--priors", type=Path, nargs=2, metavar=("TOP", "BOTTOM"),
                    default=[REPO / "checkpoints" / "cifar10-prior-top.pt", REPO / "checkpoints" /
                             "cifar10-prior-bottom.pt"], help="CIFAR-10 top and bottom code priors (lossy rows)")
    ap.add_argument("--cifar", type=Path, default=DATA / "cifar10" / "test.npz")
    ap.add_argument("--mnist", type=Path, default=DATA / "mnist" / "test.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)

    codecs = {"PNG (Pillow, compress_level 9, optimize)": png_codec(), **imagecodecs_codecs()}
    print(f"Machine: {machine()}\n")
    print("| data | codec | container | bits/dim | bytes/image | encode images/s | decode images/s | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path, model in (("CIFAR-10 test", args.cifar, args.model), ("MNIST test", args.mnist,
                                                                             args.mnist_model)):
        if not path.exists():
            print(f"| {label} | (data not found: {path}) | | | | | | |")
            continue
        images = load(path, args.num)
        dims = images.size
        rows = [per_image(name, enc, dec, images) for name, (enc, dec) in codecs.items()]
        if model is not None:
            rows += ours(model, images, args.batch_size)
        else:
            rows.append({"codec": "vqprior compress: skipped (no pixel model; pass --mnist-model)", "bytes": None})
        for r in rows:
            if r["bytes"] is None:
                print(f"| {label} ({len(images)}) | {r['codec']} | | | | | | |")
                continue
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            exact = "-" if r["exact"] is None else ("yes" if r["exact"] else "**NO**")
            print(f"| {label} ({len(images)}) | {r['codec']} | {r['container']} | {8 * r['bytes'] / dims:.3f} | "
                  f"{r['bytes'] / len(images):.0f} | {fmt(r['enc'])} | {fmt(r['dec'])} | {exact} |", flush=True)
    if args.cifar.exists() and all(p.exists() for p in args.priors):
        r = lossy(*args.priors, load(args.cifar, args.num), args.batch_size)
        print("\n| data | lossy codec | bits/pixel | bytes/image | PSNR dB | encode images/s | decode images/s | "
              "codes exact |\n|---|---|---|---|---|---|---|---|")
        print(f"| CIFAR-10 test ({args.num}) | VQ-VAE codes + {args.priors[0].name} / {args.priors[1].name} (one file, "
              f"{r['header']} B header) | {r['bpp']:.3f} | {r['bytes']:.0f} | {r['psnr']:.2f} | {r['enc']:.1f} | "
              f"{r['dec']:.1f} | {'yes' if r['exact'] else '**NO**'} |")


if __name__ == "__main__":
    main()
