"""The rows of bench/gpu_check.py that run vqprior's commands: training in each precision (with peak GPU memory),
resume, deterministic runs, evaluate, cached / compiled sampling, extract-codes, compress and torchrun. Each row
returns the figure it checked, raises ``Skip`` where it does not apply, and raises on failure (its fail condition
is in its docstring)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "checkpoints"
CODE_TIE = 1e-3  # codes may differ from the CPU's only where the two nearest codes are this close (relative)
EVALUATE_TOLERANCE = 1e-3  # bits/dim between the device and the CPU, fp32
COMPILED_UNEQUAL = 4  # of the compiled row's 16 samples, at most this many may differ (docs/exactness.md)
FORWARD_TOLERANCE = 1e-3  # cached / compiled conditionals vs a full forward pass, float32 on any device


class Skip(Exception):
    """A row that does not apply here (the reason is the message)."""


def has_option(command: str, option: str, value: str | None = None) -> bool:
    from vqprior.commands.cli import cli

    for p in cli.commands[command].params:
        if option in p.opts:
            return value is None or value in getattr(p.type, "choices", ())
    return False


def last_metrics(run: Path, split: str = "train") -> dict:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("split") == split]
    if not records:
        raise RuntimeError(f"no {split} record in {run / 'metrics.jsonl'}")
    return records[-1]


def loss_figure(run: Path) -> str:
    r = last_metrics(run)
    values = {k: v for k, v in r.items() if k not in ("step", "split", "lr", "skipped_steps", "train_seconds")}
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite {', '.join(bad)} at step {r['step']}")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "items_per_s")
    return f"step {r['step']}: {shown}, {r.get('items_per_s', 0):.0f} items/s"


def train_args(c, command: str) -> list:
    quick = c.args.quick
    common = ["--steps", 4 if quick else 20, "--batch-size", 4 if quick else 32, "--eval-every", 1000,
              "--sample-every", 1000, "--eval-limit", 4 if quick else 64, "--num-samples", 2, "--quiet",
              "--device", c.args.device]
    if command == "train-prior":
        return ["--codes", c.work / "codes-train.lmdb", "--level", "top", "--preset", "tiny" if quick else "small",
                *common]
    size = ["--image-size", 8] if quick else []
    return ["--dataset", "sample", "--limit", 16 if quick else 512, "--preset", "tiny" if quick else "small", *size,
            *common]


def train_row(c, command: str, *extra) -> str:
    """Fails on an error, a non-finite metric or a missing record; reports peak GPU memory."""
    if "--precision" in extra:
        precision = extra[extra.index("--precision") + 1]
        if not has_option(command, "--precision", precision):
            raise Skip(f"not available: --precision {precision} is not an option of this checkout")
        if precision == "fp16" and c.args.device == "cpu":
            raise Skip("fp16 is a GPU precision")
    if "--compile" in extra and c.args.device == "cpu" and c.args.quick:
        raise Skip("--quick on the CPU: inductor's C++ build takes minutes")
    if "--checkpoint-activations" in extra and command == "train-vqvae":
        raise Skip("refused by design: recomputation applies to PixelSNAIL models (pixels and priors)")
    if command == "train-prior" and not (c.work / "codes-train.lmdb").exists():
        raise Skip("no code cache (the extract-codes row failed or was skipped)")
    run = c.work / f"{command}-{c.count}"
    with c.peak_memory() as peak:
        c.cli(command, *train_args(c, command), *extra, "--out", run)
    return loss_figure(run) + peak.text()


def resume_row(c) -> str:
    """Fails unless the resumed run's last record is the step it was asked to reach."""
    run = c.work / "resume"
    args = train_args(c, "train-pixels")
    steps = int(args[args.index("--steps") + 1])
    c.cli("train-pixels", *args, "--out", run)
    args[args.index("--steps") + 1] = steps + 2
    c.cli("train-pixels", *args, "--out", run, "--resume")
    step = last_metrics(run)["step"]
    if step != steps + 2:
        raise RuntimeError(f"the resumed run's last record is step {step}, not {steps + 2}")
    return f"resumed from step {steps} to {step}; " + loss_figure(run)


def deterministic_row(c) -> str:
    """Fails unless two --deterministic runs log identical metrics at every step."""
    runs = []
    for i in range(2):
        run = c.work / f"deterministic-{i}"
        c.cli("train-pixels", *train_args(c, "train-pixels"), "--deterministic", "--out", run)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs.append([{k: v for k, v in r.items() if k not in ("items_per_s", "train_seconds")} for r in records])
    if runs[0] != runs[1]:
        raise RuntimeError(f"two --deterministic runs differ: {runs[0][-1]} vs {runs[1][-1]}")
    last = {k: v for k, v in runs[0][-1].items() if k not in ("step", "split", "lr", "skipped_steps")}
    return f"two runs, identical metrics at every logged step (last: {last})"


def bits_per_dim(output: str) -> float:
    """The figure evaluate prints first, past any warning line."""
    for line in output.splitlines():
        try:
            return float(line.split()[0])
        except (ValueError, IndexError):
            continue
    raise RuntimeError(f"no bits/dim in evaluate's output: {output[-300:]!r}")


def evaluate_args(c) -> list:
    return ["evaluate", CHECKPOINTS / "cifar10-pixels-small.pt", "--dataset", "sample", "--limit",
            4 if c.args.quick else 100, "--quiet"]


def evaluate_row(c) -> str:
    """Fails when fp32 bits/dim on the device differ from the CPU's by more than EVALUATE_TOLERANCE."""
    here = bits_per_dim(c.cli(*evaluate_args(c), "--device", c.args.device))
    cpu = bits_per_dim(c.cli(*evaluate_args(c), "--device", "cpu"))
    if abs(here - cpu) > EVALUATE_TOLERANCE:
        raise RuntimeError(f"{here:.5f} bits/dim on {c.args.device} vs {cpu:.5f} on the CPU")
    return (f"{here:.4f} bits/dim on {c.args.device}, {cpu:.4f} on the CPU (first {evaluate_args(c)[5]} sample "
            f"test images; tolerance {EVALUATE_TOLERANCE})")


def sampling_row(c, compiled: bool) -> str:
    """Cached (or compiled) conditionals against a full forward pass on the last rows of real images, then samples.
    Fails when the conditionals differ by more than FORWARD_TOLERANCE; the compiled row also when more than
    COMPILED_UNEQUAL of its samples differ from the eager cached ones or CUDA graphs were skipped."""
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.data.loader import load_image_dataset
    from vqprior.sampling.cached import CachedSampler
    from vqprior.sampling.sampler import sample

    device = torch.device(c.args.device)
    # The --quick CPU check compiles with the eager backend (inductor's C++ build takes minutes), so that this
    # row's code runs in the test suite; everywhere else inductor, with CUDA graphs on CUDA.
    options = {"backend": "eager"} if c.args.quick and device.type == "cpu" else \
        {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    model = load_model(CHECKPOINTS / "cifar10-pixels-small.pt", device, kind="pixels")
    batch = 2 if c.args.quick else 16
    ds = load_image_dataset("sample", "test", limit=batch)
    images = torch.stack([ds[i]["image"] for i in range(batch)]).to(device)
    H, W = model.config.height, model.config.width
    start = H * W - (W if c.args.quick else 4 * W)  # the last rows are sampled, the rest is the real image

    def timed(**kw):
        g = torch.Generator(device=device).manual_seed(0)
        c.sync()
        t0 = time.perf_counter()
        out = sample(model, batch, generator=g, prefix=images, start=start, **kw)
        c.sync()
        return out, 1e3 * (time.perf_counter() - t0) / (H * W - start)

    worst = 0.0
    with torch.no_grad():
        s = CachedSampler(model.eval(), batch, static=compiled)
        if compiled:
            s.compile(**options)
        s.prefill(images, start)
        for p in range(start, H * W):
            known = images.clone()
            known.view(batch, -1, H * W)[:, :, p:] = 0
            full = model(known)[:, :, p // W, p % W]
            worst = max(worst, float((s.step(p) - full).abs().max()))
            s.append(p, images[:, :, p // W, p % W])
        s.close()
    if worst > FORWARD_TOLERANCE:
        raise RuntimeError(f"{'compiled' if compiled else 'cached'} conditionals differ from a full forward by "
                           f"{worst:.2e}")
    if not compiled:
        cached, ms_cached = timed(method="cached")
        naive, ms_naive = timed(method="naive")
        equal = float((cached == naive).flatten(1).all(1).float().mean())
        return (f"cached {ms_cached:.3f} ms/pos, naive {ms_naive:.3f} ms/pos (batch {batch}); conditionals within "
                f"{worst:.2e}; {100 * equal:.0f}% of samples identical")
    from torch._dynamo.utils import counters

    skips_before = counters["inductor"].get("cudagraph_skips", 0)
    timed(compile=options)  # compilation, untimed
    ref, ms_ref = timed(method="cached")
    out, ms = timed(compile=options)
    skips = counters["inductor"].get("cudagraph_skips", 0) - skips_before
    unequal = int((out != ref).flatten(1).any(1).sum())
    allowed = COMPILED_UNEQUAL * batch // 16
    how = "eager backend, " if options.get("backend") == "eager" else ""
    figure = (f"compiled ({how}static shapes) {ms:.3f} ms/pos vs eager cached {ms_ref:.3f}; conditionals within "
              f"{worst:.2e} of a full forward; {unequal} of {batch} samples differ from eager cached (allowed "
              f"{allowed}); CUDA graph skips {skips}")
    if unequal > allowed or skips:
        raise RuntimeError(figure)
    return figure


def sample_cli_row(c, command: str) -> str:
    """Fails on an error."""
    if c.args.device == "cpu" and c.args.quick:
        raise Skip("--quick on the CPU: inductor's C++ build takes minutes")
    model = CHECKPOINTS / "cifar10-pixels-small.pt"
    out = c.work / f"{command}-compile.png"
    if command == "sample":
        text = c.cli("sample", model, "--num", 4, "--compile", "--quiet", "--out", out, "--device", c.args.device)
    else:
        image = c.work / "complete-in.png"
        c.cli("sample", model, "--num", 1, "--quiet", "--out", image, "--device", c.args.device)
        text = c.cli("complete", model, "--image", image, "--keep-rows", 16, "--num", 4, "--compile", "--quiet",
                     "--out", out, "--device", c.args.device)
    return text.strip().splitlines()[-1]


def extract_row(c) -> str:
    """Codes extracted on the device against a CPU extraction. Fails unless every differing code is a near tie
    on the CPU's encoder output (the two codes' squared distances within CODE_TIE relative); a level below a
    differing code is conditioned on other codes and is not compared."""
    vq = CHECKPOINTS / "cifar10-vqvae.pt"
    limit = 8 if c.args.quick else 256
    for split in ("train", "test"):
        c.cli("extract-codes", "--vqvae", vq, "--dataset", "sample", "--split", split, "--limit", limit, "--quiet",
              "--out", c.work / f"codes-{split}.lmdb", "--device", c.args.device)
    c.cli("extract-codes", "--vqvae", vq, "--dataset", "sample", "--split", "test", "--limit", limit, "--quiet",
          "--out", c.work / "codes-cpu.lmdb", "--device", "cpu")
    return compare_codes(c.work / "codes-test.lmdb", c.work / "codes-cpu.lmdb", vq, limit)


def compare_codes(here_path: Path, cpu_path: Path, vq: Path, limit: int) -> str:
    import torch

    from vqprior.checkpoint import load_model
    from vqprior.data.codes import CodeDataset
    from vqprior.data.loader import load_image_dataset

    here, cpu = CodeDataset(here_path), CodeDataset(cpu_path)
    vqvae = load_model(vq, "cpu", kind="vqvae")
    images = load_image_dataset("sample", "test", limit=limit)
    total = differ = skipped = 0
    worst = 0.0
    for i in range(len(cpu)):
        with torch.no_grad():
            stats = vqvae(images[i]["image"][None])["stats"]
        for level, (inputs, _), quantizer in zip(cpu.level_names, stats, vqvae.quantizers):
            a, b = torch.as_tensor(here[i][level]).flatten(), torch.as_tensor(cpu[i][level]).flatten()
            total += a.numel()
            where = (a != b).nonzero().flatten()
            if not where.numel():
                continue
            differ += where.numel()
            z, codebook = inputs[where].double(), quantizer.embedding.double()
            d_here = (z - codebook[a[where]]).pow(2).sum(1)
            d_cpu = (z - codebook[b[where]]).pow(2).sum(1)
            gap = float(((d_here - d_cpu).abs() / d_cpu.clamp_min(1e-12)).max())
            worst = max(worst, gap)
            if gap > CODE_TIE:
                raise RuntimeError(f"image {i}, {level}: a code differs from the CPU's where it is not a near tie "
                                   f"(distances {gap:.2e} apart, relative; allowed {CODE_TIE})")
            skipped += len(cpu.level_names) - 1 - cpu.level_names.index(level)
            break  # the levels below were encoded from other codes
    return (f"{total} codes ({len(cpu)} images, {', '.join(cpu.level_names)}): {differ} differ from the CPU "
            f"extraction, each a near tie (worst {worst:.1e} relative, allowed {CODE_TIE}); {skipped} lower "
            f"level maps below a differing code not compared")


def compress_row(c) -> str:
    """Fails unless the images round-trip exactly; on a GPU also unless the CPU refuses (or decodes) the file."""
    import numpy as np

    from vqprior.data.loader import load_image_dataset

    try:
        import constriction  # noqa: F401
    except ImportError:
        raise Skip("constriction is not installed (see bench/gpu_check.py's header)") from None
    model = CHECKPOINTS / "cifar10-pixels-small.pt"
    n = 1 if c.args.quick else 8
    ds = load_image_dataset("sample", "test", limit=n)
    images = np.stack([ds[i]["image"].numpy() for i in range(n)])
    np.save(c.work / "images.npy", images)
    packed, back = c.work / "images.vqz", c.work / "back.npy"
    text = c.cli("compress", model, c.work / "images.npy", "--out", packed, "--device", c.args.device)
    c.cli("decompress", model, packed, "--out", back, "--device", c.args.device)
    if not np.array_equal(np.load(back), images):
        raise RuntimeError("decompressed images differ from the originals")
    figure = text.split("=")[-1].strip().split(" (")[0]
    if c.args.device != "cpu":
        try:
            c.cli("decompress", model, packed, "--out", c.work / "cpu.npy", "--device", "cpu")
        except RuntimeError as e:
            if "compressed on" not in str(e):
                raise
            figure += "; the CPU refuses the file before decoding"
        else:
            figure += "; the CPU decoded it too (bitwise equal arithmetic)"
    return f"{n} images round trip at {figure}"


def torchrun_row(c) -> str:
    """Fails on a non-zero exit or a non-finite metric."""
    import torch

    if c.args.device != "cuda" or torch.cuda.device_count() < 2:
        raise Skip("needs 2 GPUs" if c.args.device == "cuda" else "the CPU check does not start processes")
    run = c.work / "torchrun"
    args = [str(a) for a in train_args(c, "train-pixels")]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vqprior.commands.cli", "train-pixels", *args, "--out", str(run)],
                          capture_output=True, text=True, timeout=c.seconds_left(), check=False)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
    return loss_figure(run)
