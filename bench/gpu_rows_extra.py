"""The rows of bench/gpu_check.py that go past the commands' own checks: one training step of the VQ-VAE-2 priors
(4,096-position attention), two-level prior sampling and prior compression in a fresh process, bf16 / fp16
evaluation against fp32, and the host syncs of a training step counted by ``torch.cuda.set_sync_debug_mode``. Each
row's fail condition is in its docstring."""
from __future__ import annotations

import subprocess
import sys
import time

from gpu_rows import CHECKPOINTS, Skip, bits_per_dim, evaluate_args

# |bits/dim under autocast - bits/dim in fp32| allowed for the shipped pixel model (docs/gpu.md, "Precision").
AUTOCAST_TOLERANCE = {"bf16": 0.05, "fp16": 0.01}
ATTENTION_KERNELS = ("flash", "efficient", "cudnn", "math")  # aten::_scaled_dot_product_<kernel>_attention...


def precision_eval_row(c, precision: str) -> str:
    """Fails when evaluate --precision PRECISION differs from fp32 by more than AUTOCAST_TOLERANCE bits/dim."""
    if precision == "fp16" and c.args.device == "cpu":
        raise Skip("fp16 is a GPU precision")
    reduced = bits_per_dim(c.cli(*evaluate_args(c), "--device", c.args.device, "--precision", precision))
    fp32 = bits_per_dim(c.cli(*evaluate_args(c), "--device", c.args.device))
    tolerance = AUTOCAST_TOLERANCE[precision]
    figure = f"{reduced:.4f} bits/dim in {precision}, {fp32:.4f} in fp32 (tolerance {tolerance})"
    if not abs(reduced - fp32) <= tolerance:
        raise RuntimeError(figure)
    return figure


def attention_kernel(events) -> str:
    """Which scaled-dot-product-attention kernels a profiled step called, from the aten op names."""
    names = {e.name for e in events if "scaled_dot_product" in e.name}
    found = [k for k in ATTENTION_KERNELS if any(f"_{k}_attention" in n or n.endswith(f"attention_{k}")
                                                 for n in names)]
    return "+".join(found) or ("none" if not names else ", ".join(sorted(names)))


def prior_step_row(c, preset: str) -> str:
    """One training step of PRESET at batch 4 on its codes (the bottom prior: 64x64 codes, 4,096 positions,
    conditioned on 32x32 top codes), after one warm-up step. Fails on an error, a non-finite loss, or SDPA's math
    kernel (L x L scores in memory) on a GPU. --quick: the preset's structure at 32 filters on 16x16 codes."""
    import torch

    from vqprior.config import PRESET_USES, model_config_from_preset
    from vqprior.models.pixelsnail import PixelSNAIL
    from vqprior.runtime.precision import precision_policy

    device, batch = torch.device(c.args.device), 4
    use = dict(PRESET_USES[preset][1])
    if c.args.quick:
        use.update(height=use["height"] // 4, width=use["width"] // 4)
        use.update(dict(filters=32, cond_channels=32, cond_layers=1, res_blocks=1) if "bottom" in preset else
                   dict(filters=32, res_blocks=1))
        if "cond_height" in use:
            use.update(cond_height=use["cond_height"] // 4, cond_width=use["cond_width"] // 4)
    torch.manual_seed(0)
    model = PixelSNAIL(model_config_from_preset(preset, **use)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, use["num_codes"], (batch, use["height"], use["width"]), generator=g).to(device)
    cond = torch.randint(0, use["cond_num_codes"], (batch, use["cond_height"], use["cond_width"]),
                         generator=g).to(device) if "cond_num_codes" in use else None

    def step():
        loss = -model.head.log_prob(model(x, condition=cond).float(), x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    with precision_policy("tf32" if device.type == "cuda" else "fp32"):
        step()  # warm-up: cuDNN's autotuner, allocations
        with c.peak_memory() as peak, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) \
                as prof:
            c.sync()
            t0 = time.perf_counter()
            loss = float(step().detach())
            c.sync()
            seconds = time.perf_counter() - t0
    kernel = attention_kernel(prof.events())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    figure = (f"{params:.1f}M parameters, {use['height']}x{use['width']} codes: {batch / seconds:.1f} img/s, loss "
              f"{loss:.3f}, attention kernel {kernel}{peak.text()}")
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError("non-finite loss: " + figure)
    if device.type == "cuda" and "math" in kernel:
        raise RuntimeError("SDPA ran its math kernel (L x L scores): " + figure)
    return figure


FRESH = """import sys, click
from vqprior.commands.cli import cli
from vqprior.runtime.allocator import retain_freed_memory
retain_freed_memory()  # as the vqprior entry point does
for args in {commands!r}:
    try:
        cli.main(args, prog_name="vqprior", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(1)
"""


def fresh_process(c, *commands) -> str:
    """The vqprior commands (argument lists) one after the other in a new Python process (nothing of this one's
    CUDA state); its output, or a RuntimeError with the last line of what it said."""
    script = FRESH.format(commands=[[str(a) for a in args] for args in commands])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=max(1.0, c.seconds_left()), check=False)
    if done.returncode:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
        raise RuntimeError(said[-1])
    return done.stdout + done.stderr


def two_level_sample_row(c) -> str:
    """sample of the shipped CIFAR-10 top prior with its bottom prior, decoded, in a fresh process. Fails on an
    error or a missing grid."""
    out = c.work / "two-level.png"
    num = 1 if c.args.quick else 8
    t0 = time.perf_counter()
    fresh_process(c, ["sample", CHECKPOINTS / "cifar10-prior-top.pt", "--bottom",
                      CHECKPOINTS / "cifar10-prior-bottom.pt", "--num", num, "--quiet", "--out", out, "--device",
                      c.args.device])
    if not out.is_file():
        raise RuntimeError(f"no grid written at {out}")
    return f"{num} samples, top then bottom codes decoded, {time.perf_counter() - t0:.1f} s with the process start"


def prior_compress_row(c) -> str:
    """compress of images with the shipped two-level priors (the VQ-VAE encodes them first, then the coder runs in
    deterministic mode: the order that needs cuBLAS's workspace set before the first product), then decompress to
    codes, in a fresh process. Fails on an error or codes of the wrong shape or range."""
    import numpy as np

    from vqprior.data.loader import load_image_dataset

    try:
        import constriction  # noqa: F401
    except ImportError:
        raise Skip("constriction is not installed (see bench/gpu_check.py's header)") from None
    n = 1 if c.args.quick else 4
    ds = load_image_dataset("sample", "test", limit=n)
    np.save(c.work / "prior-images.npy", np.stack([ds[i]["image"].numpy() for i in range(n)]))
    top, bottom, packed = CHECKPOINTS / "cifar10-prior-top.pt", CHECKPOINTS / "cifar10-prior-bottom.pt", \
        c.work / "prior.vqz"
    said = fresh_process(c, ["compress", top, c.work / "prior-images.npy", "--bottom", bottom, "--out", packed,
                             "--device", c.args.device],
                         ["decompress", top, packed, "--bottom", bottom, "--out", c.work / "prior-codes.npz",
                          "--device", c.args.device]).strip().splitlines()
    said = [line for line in said if line.startswith("compressed")]
    codes = np.load(c.work / "prior-codes.npz")
    shapes = {k: codes[k].shape for k in codes.files}
    if not shapes or any(s[0] != n for s in shapes.values()) or any((codes[k] < 0).any() or (codes[k] >= 512).any()
                                                                     for k in codes.files):
        raise RuntimeError(f"decompressed codes of unexpected shape or range: {shapes}")
    return f"{n} images -> {', '.join(f'{k} {s[1:]}' for k, s in shapes.items())} codes; {said[-1] if said else ''}"


def sync_tasks() -> dict:
    """The three train commands' tasks on random data of their real sizes (32x32 images, 8x8 top codes)."""
    import torch

    from vqprior.config import DataConfig, model_config_from_preset
    from vqprior.models.vqvae import vqvae_config_from_preset
    from vqprior.training.pixel_task import PixelTask
    from vqprior.training.prior_task import PriorTask
    from vqprior.training.vqvae_task import VQVAETask

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    codes = torch.randint(0, 512, (64, 8, 8), generator=g)
    data = DataConfig(dataset="synthetic")
    pictures = [{"image": image} for image in images]  # a list is a map-style dataset
    return {"pixels": (PixelTask(model_config_from_preset("small"), data), pictures),
            "prior": (PriorTask(model_config_from_preset("small", head="codes", num_codes=512, height=8, width=8),
                                data, "top"), [{"top": top} for top in codes]),
            "vqvae": (VQVAETask(vqvae_config_from_preset("base", levels=2), data), pictures)}


def sync_row(c) -> str:
    """Host syncs of plain training steps (1 to 9, between logging steps) of each train command's task, counted by
    torch.cuda.set_sync_debug_mode("warn"). Fails when a step syncs more than once (one process should not at
    all: docs/gpu.md, "Host syncs in the training step")."""
    import warnings

    import torch

    if not c.args.device.startswith("cuda"):
        raise Skip("torch.cuda.set_sync_debug_mode counts CUDA syncs only")
    from vqprior.config import TrainConfig
    from vqprior.training.loop import TrainingRun, train

    counts = {}
    for name, (task, data) in sync_tasks().items():
        per_step, real = [], TrainingRun.train_step

        def step(self, batch, number, stop, _real=real, _per_step=per_step):
            if number == 0:
                return _real(self, batch, number, stop)  # the first step allocates and autotunes
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return _real(self, batch, number, stop)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    _per_step.append(sum("synchroniz" in str(w.message) for w in caught))

        TrainingRun.train_step = step
        try:
            config = TrainConfig(steps=10, batch_size=32, num_samples=2, eval_every=100, sample_every=100,
                                 checkpoint_every=100)
            train(task, data, None, config, c.work / f"syncs-{name}", device=c.args.device, progress=False)
        finally:
            TrainingRun.train_step = real
        counts[name] = per_step
    figure = "; ".join(f"{name} {per_step}" for name, per_step in counts.items())
    if any(n > 1 for per_step in counts.values() for n in per_step):
        raise RuntimeError("more than one sync in a step: " + figure)
    return "syncs in steps 1-9: " + figure
