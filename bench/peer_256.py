"""VQ-VAE-2 at 256x256 side by side with rosinality's vq-vae-2-pytorch at its defaults (docs/vqvae2-256.md).

The peer is NOT part of this repository: fetch it yourself and pass its folder with ``--peer`` (its ``vqvae.py`` and
``pixelsnail.py`` are imported from there; its ``sample.py`` needs torchvision, so its sampling loop body is quoted
below instead). Every row runs in a fresh subprocess with ``--threads`` torch threads, so its memory peak is its own.

Rows (theirs at their train scripts' defaults; ours at the matched presets, parameter counts printed):

* ``vqvae``: a training step at 256x256, batch ``--vq-batch``. Theirs: ``VQVAE()``, MSE + 0.25 latent loss, Adam.
  Ours: ``vqvae2-256``, ``VQVAETask.loss`` (MSE + commitment, then the EMA codebook update), fused Adam.
* ``top`` / ``bottom``: a prior training step, batch ``--prior-batch``. Theirs: ``PixelSNAIL`` as
  train_pixelsnail.py builds it for ``--hier top`` / ``bottom``, cross-entropy, Adam. Ours: ``vqvae2-top`` (class-
  conditional, 10 classes) / ``vqvae2-bottom`` (conditioned on 32x32 top codes), ``-log_prob(...).mean()``, fused
  Adam; ``bottom+ckpt`` adds ``--checkpoint-activations`` (each gated block and attention step recomputed in the
  backward pass).
* ``attn-<L>-<kernel>``: forward + backward of one of our CausalSelfAttention steps over L positions (256 filters,
  8 heads, 128 key/value channels, batch 1) with SDPA's fused ``flash`` CPU kernel or the ``math`` kernel (which
  builds the L x L score matrices): memory linear vs quadratic in L.
* ``sample``: 256x256 samples' codes (32x32 top, then 64x64 bottom), batch ``--sample-batch`` (8, sample.py's
  default), reported per image. Ours: ``vqprior.sample`` with the cached sampler, timed whole. Theirs: sample.py's
  ``sample_model`` runs, per position (i, j), a full forward pass over rows 0..i (``model(row[:, :i+1, :],
  condition=..., cache=cache)``), then softmax and multinomial. A whole image takes hours on a CPU, so a few
  positions per level are timed at rows spread over the map, the cost per position is fitted as a + b * i (least
  squares; it grows with the rows passed) and summed over every position: an extrapolation, labelled so.

How each number is measured: s/step is the median over ``--steps`` timed steps after one warm-up step
(``time.perf_counter``). Peak RSS is ``ru_maxrss`` of the subprocess after the timed steps; our training rows set
glibc's allocator as ``vqprior train`` does (``vqprior.runtime.allocator.configure_for_training``: freed memory kept, or
given back at once with checkpointing), the peer's rows run with glibc's defaults as its scripts do, or with ours
under checkpointing (``--peer-allocator lean``). Per image: (peak RSS
minus the RSS after building the model, minus 3 x the parameter bytes for the gradients and Adam's two moments)
/ batch, i.e. activations and workspace per image. The training rows also count each side's FLOPs per image
(``bench/flops.py``: one forward and backward under torch's FLOP counter) and measure the fp32 matmul peak in our
row's process; the ceiling column is the fastest our step could run here (its FLOPs at that peak) over their
measured time per image: no speed-up target above it can be met on this machine.

Usage (the full run takes ~10 minutes on 2 cores; time it on an idle machine):
    python bench/peer_256.py --peer ../vq-vae-2-pytorch
    python bench/peer_256.py --peer PATH --quick      # tiny widths and 32x32 images: checks the script in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROWS = ("vqvae", "top", "bottom", "bottom+ckpt", "attn", "sample")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ---- the models, theirs and ours -----------------------------------------------------------------------------------
def sizes(quick: bool) -> dict:
    """Image side, peer PixelSNAIL width/blocks and our overrides: the real sizes, or tiny ones for --quick."""
    if quick:
        return dict(image=32, channel=16, n_block=1, n_res_block=1, vq=dict(channel=16, n_res_channel=8, embed_dim=8,
                    n_embed=16), ours=dict(filters=16, blocks=1, res_blocks=1, key_channels=8, value_channels=8,
                                           embed_dim=16, cond_channels=16), ours_vq=dict(hidden=16, res_channels=8,
                                                                                         embed_dim=8, codebook_size=16))
    return dict(image=256, channel=256, n_block=4, n_res_block=4, vq={}, ours={}, ours_vq={})


def their_prior(level: str, s: dict):
    from pixelsnail import PixelSNAIL as Theirs  # the peer's, from --peer

    side, n = s["image"] // (8 if level == "top" else 4), s["vq"].get("n_embed", 512)
    if level == "top":  # train_pixelsnail.py's construction, defaults: dropout 0.1, n_out_res_block 0
        return Theirs([side, side], n, s["channel"], 5, s["n_block"], s["n_res_block"], s["channel"], dropout=0.1,
                      n_out_res_block=0)
    return Theirs([side, side], n, s["channel"], 5, s["n_block"], s["n_res_block"], s["channel"], attention=False,
                  dropout=0.1, n_cond_res_block=3, cond_res_channel=s["channel"])


def our_prior(level: str, s: dict):
    from vqprior.config import model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL

    side, n = s["image"] // (8 if level == "top" else 4), s["vq"].get("n_embed", 512)
    cond = dict(num_classes=10) if level == "top" else dict(cond_num_codes=n, cond_height=side // 2,
                                                             cond_width=side // 2)
    return PixelSNAIL(model_config_from_preset(f"vqvae2-{level}", head="codes", num_codes=n, height=side,
                                               width=side, **cond, **s["ours"]))


def codes(s: dict, side: int, batch: int):
    import torch

    return torch.randint(0, s["vq"].get("n_embed", 512), (batch, side, side))


# ---- one row, in its own process -----------------------------------------------------------------------------------
def timed(step, steps: int) -> float:
    step()  # warm-up: allocator, oneDNN primitives, Adam state
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_row(side: str, row: str, s: dict, batch: int, steps: int, peer_allocator: str = "default") -> dict:
    import torch
    import torch.nn.functional as F

    if row == "vqvae":
        images = torch.randint(0, 256, (batch, 3, s["image"], s["image"]), dtype=torch.uint8)
        if side == "theirs":
            from vqvae import VQVAE as TheirVQVAE
            model = TheirVQVAE(**s["vq"])
            x = images.float() / 127.5 - 1

            def loss():
                out, latent = model(x)
                return F.mse_loss(out, x) + 0.25 * latent.mean()
        else:
            from vqprior.config import DataConfig
            from vqprior.models.vqvae import vqvae_config_from_preset
            from vqprior.training.vqvae_task import VQVAETask
            task = VQVAETask(vqvae_config_from_preset("vqvae2-256", **s["ours_vq"]), DataConfig())
            model = task.build_model()
            task.init_model(model, {"image": images})

            def loss():
                return task.loss(model, {"image": images})[0]
    else:
        level = "top" if row == "top" else "bottom"
        grid = s["image"] // (8 if level == "top" else 4)
        target, top = codes(s, grid, batch), codes(s, s["image"] // 8, batch)
        if side == "theirs":
            model = their_prior(level, s)

            def loss():
                out, _ = model(target, condition=top if level == "bottom" else None)
                return F.cross_entropy(out, target)
        else:
            model = our_prior(level, s)
            model.checkpoint_activations = row == "bottom+ckpt"
            label = torch.randint(0, 10, (batch,))
            # Initialised as train-prior initialises it (weight norm's data-dependent init on the batch): without
            # it the activations grow with depth into ranges where exp and sigmoid run many times slower on some
            # CPUs (float32 results in the subnormal range), a step no training run takes.
            from vqprior.models.layers import data_dependent_init
            data_dependent_init(model, target, **(dict(label=label) if level == "top" else dict(condition=top)))

            def loss():
                if level == "top":
                    return -model.log_prob(target, label=label).mean()
                return -model.log_prob(target, condition=top).mean()
    model.train()
    if side == "ours":  # host memory settings as `vqprior train` makes them (vqprior.runtime.allocator)
        from vqprior.runtime.allocator import configure_for_training
        configure_for_training(row == "bottom+ckpt")
    elif peer_allocator == "lean":
        from vqprior.runtime.allocator import return_freed_memory
        return_freed_memory()
    params = sum(p.numel() for p in model.parameters())
    built = rss_mb()
    if side == "ours":
        from vqprior.training.acceleration import make_optimizer
        opt = make_optimizer(model, 3e-4, (0.9, 0.999))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    seconds = timed(step, steps)
    peak = peak_mb()
    from flops import matmul_peak, step_flops
    return dict(params=params, s_per_step=seconds, images_per_s=batch / seconds, peak_mb=peak,
                per_image_mb=(peak - built - 3 * 4 * params / 2**20) / batch,
                flops_per_image=step_flops(lambda: loss().backward()) / batch,
                peak_flops=matmul_peak() if side == "ours" else None)  # one peak per row: the ceiling's


def attention_row(length: int, kernel: str, steps: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vqprior.models.attention import CausalSelfAttention, background

    side = int(length ** 0.5)
    attn = CausalSelfAttention(256, 256, 128, 128, heads=8)
    raw, h = torch.randn(1, 256, side, side), torch.randn(1, 256, side, side, requires_grad=True)
    bg = background(side, side)
    built = rss_mb()
    backend = SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.MATH

    def step():
        with sdpa_kernel(backend):
            attn(raw, h, bg).sum().backward()

    seconds = timed(step, steps)
    return dict(s_per_step=seconds, peak_mb=peak_mb(), per_image_mb=peak_mb() - built)


def their_position_seconds(model, level: str, s: dict, rows: list[int], condition) -> list[float]:
    """sample.py's loop body at (i, 0) for each row i: the forward over rows 0..i, softmax, multinomial."""
    import torch

    side = s["image"] // (8 if level == "top" else 4)
    row, cache, out = torch.zeros(condition_batch(condition, s), side, side, dtype=torch.int64), {}, []
    for i in [rows[0]] + rows:  # the first call warms up (and fills the condition cache, as sample.py's does)
        t = time.perf_counter()
        o, cache = model(row[:, : i + 1, :], condition=condition, cache=cache)
        row[:, i, 0] = torch.multinomial(torch.softmax(o[:, :, i, 0] / 1.0, 1), 1).squeeze(-1)
        out.append(time.perf_counter() - t)
    return out[1:]


def condition_batch(condition, s: dict) -> int:
    return s["batch"] if condition is None else condition.shape[0]


def sample_row(side: str, s: dict, fit_rows: int, batch: int) -> dict:
    import torch

    s = dict(s, batch=batch)
    torch.manual_seed(0)
    result = {}
    with torch.no_grad():
        if side == "ours":
            from vqprior import sample
            top_model, bottom_model = our_prior("top", s).eval(), our_prior("bottom", s).eval()
            t = time.perf_counter()
            top = sample(top_model, batch, label=3, generator=torch.Generator().manual_seed(0))
            result["top_s"] = (time.perf_counter() - t) / batch
            t = time.perf_counter()
            sample(bottom_model, batch, condition=top, generator=torch.Generator().manual_seed(1))
            result["bottom_s"] = (time.perf_counter() - t) / batch
        else:
            for level in ("top", "bottom"):
                model = their_prior(level, s).eval()
                grid = s["image"] // (8 if level == "top" else 4)
                rows = sorted({round(k * (grid - 1) / (fit_rows - 1)) for k in range(fit_rows)})
                cond = codes(s, grid // 2, batch) if level == "bottom" else None
                seconds = their_position_seconds(model, level, s, rows, cond)
                n, mx, my = len(rows), statistics.mean(rows), statistics.mean(seconds)
                b = sum((r - mx) * (y - my) for r, y in zip(rows, seconds)) / max(
                    1e-12, sum((r - mx) ** 2 for r in rows))
                a = my - b * mx
                # every position of every row, per image
                result[f"{level}_s"] = grid * sum(a + b * i for i in range(grid)) / batch
                result[f"{level}_fit"] = dict(rows=rows, seconds=seconds, n=n)
    result["total_s"] = result["top_s"] + result["bottom_s"]
    return result


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.peer)
    s = sizes(args.quick)
    side, row = args.worker.split(":")
    if row.startswith("attn-"):
        _, length, kernel = row.split("-")
        return attention_row(int(length), kernel, args.steps)
    if row == "sample":
        return sample_row(side, s, args.fit_rows, args.sample_batch)
    batch = args.vq_batch if row == "vqvae" else args.prior_batch
    return train_row(side, row, s, batch, args.steps, args.peer_allocator)


# ---- the table ----------------------------------------------------------------------------------------------------
def machine() -> str:
    import torch
    from machine import cpu_name
    return f"{cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}"


def ceilings(theirs_by_row: dict, ours_by_row: dict) -> None:
    """Each side's counted FLOPs per image and achieved share of the fp32 matmul peak, and the fastest our step
    could be against theirs: our FLOPs per image at that peak, over their measured time per image."""
    print("\n| row | theirs: GFLOP/image, GFLOP/s achieved (of the matmul peak) | ours: GFLOP/image, GFLOP/s achieved "
          "(of the peak) | ceiling: our FLOPs at the peak, speed over theirs |")
    print("|---|---|---|---|")
    for row, ours in ours_by_row.items():
        theirs, peak = theirs_by_row[row.split("+")[0]], ours["peak_flops"]

        def cell(r: dict) -> str:
            achieved = r["flops_per_image"] * r["images_per_s"]
            return f"{r['flops_per_image'] / 1e9:.3g}, {achieved / 1e9:.3g} ({achieved / peak:.0%})"
        print(f"| {row} | {cell(theirs)} | {cell(ours)} | "
              f"{peak / ours['flops_per_image'] / theirs['images_per_s']:.2f}x |", flush=True)
    print(f"# fp32 matmul peak (2048x2048 torch.mm, median): {peak / 1e9:.1f} GFLOP/s; FLOPs as "
          "torch.utils.flop_counter counts them (bench/flops.py): convolutions, matmuls, attention")


def run_worker(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--peer", args.peer, "--threads", str(args.threads),
           "--steps", str(args.steps), "--vq-batch", str(args.vq_batch), "--prior-batch", str(args.prior_batch),
           "--fit-rows", str(args.fit_rows), "--sample-batch", str(args.sample_batch),
           "--peer-allocator", args.peer_allocator]
    cmd += ["--quick"] if args.quick else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args) -> None:
    rows = args.rows.split(",")
    lengths = (64, 256) if args.quick else (1024, 4096)
    print(f"# bench/peer_256.py on {machine()}; {args.threads} threads; "
          f"{'QUICK (tiny widths, 32x32 images)' if args.quick else '256x256 images'}")
    print(f"# command: python bench/peer_256.py {' '.join(sys.argv[1:])}")
    print("# host memory (glibc): ours as `vqprior train` sets it (freed memory kept for the next step; given back at "
          "once with --checkpoint-activations), theirs " + ("with glibc's defaults" if args.peer_allocator == "default"
                                                             else "given back at once like ours with checkpointing"))
    if set(rows) & {"vqvae", "top", "bottom", "bottom+ckpt"}:
        print("| row | batch | theirs: params, images/s, peak RSS MB, MB/image | ours: params, images/s, peak RSS MB, "
              "MB/image | speed ours/theirs | memory/image ours/theirs |")
        print("|---|---|---|---|---|---|")
    theirs_by_row, ours_by_row = {}, {}
    for row in ("vqvae", "top", "bottom", "bottom+ckpt"):
        if row not in rows:
            continue
        theirs = theirs_by_row.get(row.split("+")[0]) or run_worker(args, f"theirs:{row.split('+')[0]}")
        theirs_by_row[row.split("+")[0]] = theirs
        ours = ours_by_row[row] = run_worker(args, f"ours:{row}")
        batch = args.vq_batch if row == "vqvae" else args.prior_batch
        cell = lambda r: (f"{r['params']:,}, {r['images_per_s']:.3f}, {r['peak_mb']:.0f}, "  # noqa: E731
                          f"{r['per_image_mb']:.0f}")
        print(f"| {row} | {batch} | {cell(theirs)} | {cell(ours)} | "
              f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x | "
              f"{ours['per_image_mb'] / max(1.0, theirs['per_image_mb']):.2f} |", flush=True)
    if theirs_by_row:
        ceilings(theirs_by_row, ours_by_row)
    if "attn" in rows:
        print("\n| our attention step, fwd+bwd, batch 1 | s | peak RSS MB | MB above the built module |")
        print("|---|---|---|---|")
        for kernel in ("flash", "math"):
            for length in lengths:
                r = run_worker(args, f"ours:attn-{length}-{kernel}")
                print(f"| {length} positions, {kernel} kernel | {r['s_per_step']:.3f} | {r['peak_mb']:.0f} | "
                      f"{r['per_image_mb']:.0f} |", flush=True)
    if "sample" in rows:
        ours, theirs = run_worker(args, "ours:sample"), run_worker(args, "theirs:sample")
        print(f"\n| seconds per image of a sample's codes, batch {args.sample_batch} | top | bottom | total |")
        print("|---|---|---|---|")
        print(f"| ours (cached sampler, timed whole) | {ours['top_s']:.1f} | {ours['bottom_s']:.1f} | "
              f"{ours['total_s']:.1f} |")
        print(f"| theirs (sample.py loop, EXTRAPOLATED from positions at rows {theirs['top_fit']['rows']} / "
              f"{theirs['bottom_fit']['rows']}) | {theirs['top_s']:.0f} | {theirs['bottom_s']:.0f} | "
              f"{theirs['total_s']:.0f} |")
        print(f"| speed-up ours/theirs | {theirs['top_s'] / ours['top_s']:.0f}x | "
              f"{theirs['bottom_s'] / ours['bottom_s']:.0f}x | {theirs['total_s'] / ours['total_s']:.0f}x |")
        print(f"# their timed positions (s): top {[round(x, 3) for x in theirs['top_fit']['seconds']]}, "
              f"bottom {[round(x, 3) for x in theirs['bottom_fit']['seconds']]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", required=True, help="folder of rosinality/vq-vae-2-pytorch (outside this repository)")
    p.add_argument("--quick", action="store_true", help="tiny widths and 32x32 images (checks the script)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=2, help="timed training steps per row (median)")
    p.add_argument("--vq-batch", type=int, default=4)
    p.add_argument("--prior-batch", type=int, default=1)
    p.add_argument("--fit-rows", type=int, default=4, help="rows of theirs timed per level for the extrapolation")
    p.add_argument("--sample-batch", type=int, default=8, help="samples drawn together (sample.py's default: 8)")
    p.add_argument("--peer-allocator", choices=("default", "lean"), default="default",
                   help="host memory settings of the peer's rows: glibc's defaults (as its scripts run) or the ones "
                        "ours trains with under --checkpoint-activations "
                        "(vqprior.runtime.allocator.return_freed_memory)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.peer, "pixelsnail.py")):
        sys.exit(f"--peer {args.peer}: no pixelsnail.py there (pass the vq-vae-2-pytorch folder)")
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        main(args)
