"""``make demo``: pictures a user recognizes from the shipped models, next to a short training run of their own.

Every picture is made by a ``vqprior`` command, printed before it runs (copy it to make more); the commands run
in this one process so torch is imported once. What it writes into --out (default runs/demo):

    shipped/<model>_samples.png              samples of each shipped model found in --checkpoints
    shipped/<model>_complete_<image>.png     completions of held-out test images (scripts/demo_images/)
    shipped/<model>_guided.png               one guided grid (--guidance), of the first shipped model with a null
                                             class (code priors first: they sample fastest); none if none has one
    latest.pt, metrics.jsonl, samples_stepN.png   the short training run (a small PixelSNAIL on the bundled sample)
    curves.png                               its learning curves (vqprior plot)
    README.txt, index.html                   which picture is which, with the command that made it

Shipped models are picked up by name, for each dataset D in DATASETS: ``D-pixels*.pt`` (pixel models),
``D-prior-top.pt`` with ``D-prior-bottom.pt`` (a 2-level VQ-VAE prior pair) and any other ``D-prior*.pt`` (a
1-level prior). A missing model is skipped, so new shipped models appear in the demo without changes here.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = {"cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
               "mnist": [str(d) for d in range(10)]}
DATASETS = tuple(CLASS_NAMES)
# Held-out images to complete: (file in scripts/demo_images, class label). Test-split images, never trained on.
TEST_IMAGES = {"cifar10": [("cifar10-test-0016.png", 5), ("cifar10-test-0006.png", 1)],
               "mnist": [("mnist-test-0000.png", 7), ("mnist-test-0001.png", 2)]}
NUM_SAMPLES, NROW, NUM_COMPLETIONS = 20, 10, 6
GUIDANCE = 1  # classifier-free guidance scale of the guided grid (docs/guidance.md)


class Demo:
    """Runs the commands and collects the index entries: (section, picture path, what it shows, command)."""

    def __init__(self, out: Path):
        self.out, self.entries, self.failed = out, [], []

    def run(self, *args) -> bool:
        """``vqprior ARGS`` in this process; False (message printed) when the command fails."""
        from click import ClickException

        from vqprior.commands.cli import cli

        args = [str(a) for a in args]
        print("$ vqprior " + " ".join(shlex.quote(a) for a in args), flush=True)
        try:
            cli.main(args=args, prog_name="vqprior", standalone_mode=False)
        except ClickException as e:
            e.show()
            self.failed.append(args[0])
            return False
        return True

    def picture(self, section: str, path: Path, what: str, command: list) -> None:
        self.entries.append((section, path, what, "vqprior " + " ".join(shlex.quote(str(a)) for a in command)))

    def make(self, section: str, path: Path, what: str, *args) -> None:
        if self.run(*args):
            self.picture(section, path, what, list(args))


def model_info(path: Path) -> tuple[bool, int]:
    """(class-conditional?, height of the images it makes) of a pixel model or a top / 1-level code prior."""
    from vqprior.checkpoint import read_checkpoint
    from vqprior.training.prior_task import vqvae_config

    data = read_checkpoint(path, ("pixels", "prior"))
    model = data["config"]["model"]
    height = int(model["height"])
    if data["kind"] == "prior":
        vq = vqvae_config(data["vqvae"]["config"])  # code rows -> image rows, as `vqprior complete` maps them
        height *= vq.total_stride if vq.levels == 2 else vq.bottom_stride
    return bool(model.get("num_classes", 0)), height


def shipped_models(checkpoints: Path, dataset: str) -> list[tuple[str, Path, Path | None]]:
    """(name, checkpoint, bottom prior or None) of the shipped models of ``dataset``, pixel models first."""
    found = [(p.stem, p, None) for p in sorted(checkpoints.glob(f"{dataset}-pixels*.pt"))]
    top, bottom = checkpoints / f"{dataset}-prior-top.pt", checkpoints / f"{dataset}-prior-bottom.pt"
    if top.is_file() and bottom.is_file():
        found.append((f"{dataset}-prior", top, bottom))
    for p in sorted(checkpoints.glob(f"{dataset}-prior*.pt")):
        if p not in (top, bottom):
            found.append((p.stem, p, None))
    return found


def has_null_class(path: Path) -> bool:
    """Whether a shipped model was trained with a null class (so it can be sampled with --guidance)."""
    from vqprior.checkpoint import read_checkpoint

    return bool(read_checkpoint(path, ("pixels", "prior"))["config"]["model"].get("null_class", False))


def show_guided(demo: Demo, checkpoints: Path) -> None:
    """One class-row grid at --guidance GUIDANCE, of the first shipped model with a null class (priors first)."""
    from vqprior.errors import UserError

    found = [(dataset, *m) for dataset in DATASETS for m in shipped_models(checkpoints, dataset)]
    found.sort(key=lambda m: "-pixels" in m[1])  # stable: priors first, then the pixel models, datasets in order
    for dataset, name, ckpt, bottom in found:
        try:
            if not has_null_class(ckpt):
                continue
        except (UserError, KeyError):
            continue  # a broken model is reported where its samples fail
        pair = ["--bottom", bottom] if bottom else []
        model = f"{ckpt.name} with {bottom.name}" if bottom else ckpt.name
        out = demo.out / "shipped" / f"{name}_guided.png"
        legend = ", ".join(f"{i} {c}" for i, c in enumerate(CLASS_NAMES[dataset]))
        demo.make(f"Guided sampling (classifier-free guidance) with {model}", out,
                  f"one row per class ({legend}) at guidance scale W = {GUIDANCE}: each conditional is "
                  f"p(x|y)^(1+W) / p(x)^W, normalised (docs/guidance.md); shown at 2x", "sample", ckpt, *pair,
                  "--num", 5 * len(CLASS_NAMES[dataset]), "--class-rows", "--guidance", GUIDANCE, "--seed", 0,
                  "--scale", 2, "--out", out)
        return


def show_shipped(demo: Demo, checkpoints: Path, images: Path) -> None:
    from vqprior.errors import UserError

    for dataset in DATASETS:
        for name, ckpt, bottom in shipped_models(checkpoints, dataset):
            pair = ["--bottom", bottom] if bottom else []
            model = f"{ckpt.name} with {bottom.name}" if bottom else ckpt.name
            section = f"Shipped model {model} (trained on the full {dataset} train split)"
            try:
                conditional, height = model_info(ckpt)
            except (UserError, KeyError) as e:
                print(f"Error: {e}", file=sys.stderr)
                demo.failed.append(ckpt.name)
                continue
            classes = CLASS_NAMES[dataset]
            legend = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
            order = f"; class-conditional: column k is class k ({legend})" if conditional else ""
            out = demo.out / "shipped" / f"{name}_samples.png"
            demo.make(section, out, f"{NUM_SAMPLES} samples{order}; shown at 2x", "sample", ckpt, *pair,
                      "--num", NUM_SAMPLES, "--nrow", NROW, "--seed", 0, "--scale", 2, "--out", out)
            for image, label in TEST_IMAGES[dataset]:
                keep = height // 2
                out = demo.out / "shipped" / f"{name}_complete_{Path(image).stem}.png"
                cls = ["--class", label] if conditional else []
                given = f" given its class ({classes[label]})" if conditional else ""
                # A prior is given codes, not pixels: `complete` shows those kept codes decoded (the rest grey).
                shown_input = ("what the prior is given (the codes of its top half decoded by the VQ-VAE, the rest "
                               "grey)" if bottom or "-prior" in name else "the input with its bottom rows greyed out")
                demo.make(section, out, f"completions of the held-out test image {image}: the original, "
                          f"{shown_input}, then {NUM_COMPLETIONS} completions that keep its top half ({keep} rows) "
                          f"and sample the rest{given}; 2x", "complete", ckpt, *pair,
                          "--image", images / image, "--keep-rows", keep, *cls, "--num", NUM_COMPLETIONS,
                          "--seed", 0, "--scale", 2, "--out", out)


def train_here(demo: Demo, steps: int, extra: list[str]) -> None:
    out = demo.out
    args = ["train-pixels", "--dataset", "sample", "--preset", "small", "--steps", steps, "--batch-size", 8,
            "--lr", "2e-3", "--eval-every", max(steps // 4, 1), "--eval-limit", 200,
            "--sample-every", steps, "--checkpoint-every", max(steps // 2, 1), "--num-samples", 16, *extra,
            "--out", out]
    if (out / "latest.pt").exists():
        args.append("--resume")
    if not demo.run(*args):
        return
    grids = sorted(out.glob("samples_step*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    section = (f"Trained here: a small PixelSNAIL, {steps} steps of batch 8 on the bundled CIFAR-10 sample (a minute "
               f"or two of CPU, so its samples are still noise: the shipped models above trained far longer)")
    if grids:
        demo.picture(section, grids[-1], f"samples of the model trained here (EMA weights){held_out(out)}", args)
    curves = out / "curves.png"
    demo.make(section, curves, "its training and held-out bits/dim against steps and training time",
              "plot", out, "--out", curves, "--x", "both")


def held_out(run: Path) -> str:
    """', held-out N bits/dim' from the run's last eval record ('' when there is none)."""
    from vqprior.errors import UserError
    from vqprior.training.plot import read_run

    try:
        evals = read_run(run).eval
    except UserError:
        return ""
    return f", held-out {evals[-1]['bpd']:.3f} bits/dim" if evals and "bpd" in evals[-1] else ""


def shown(path: Path) -> Path:
    """``path`` relative to the working folder when it lies inside it, so the printed commands read naturally."""
    rel = os.path.relpath(path.absolute())
    return Path(rel) if not rel.startswith("..") else path


def write_index(demo: Demo, seconds: float) -> tuple[Path, Path]:
    from vqprior.io import atomic_write

    lines = ["vqprior demo: which picture is which", f"written by scripts/demo.py in {seconds:.0f} s", ""]
    page = ["<!doctype html><meta charset='utf-8'><title>vqprior demo</title>",
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{image-rendering:pixelated;"
            "max-width:100%}code{font-size:80%;color:#555}</style><h1>vqprior demo</h1>"]
    section = None
    for sec, path, what, command in demo.entries:
        rel = os.path.relpath(path, demo.out)
        if sec != section:
            section = sec
            lines += ["", sec]
            page.append(f"<h2>{html.escape(sec)}</h2>")
        lines += [f"  {rel}", f"      {what}", f"      made by: {command}"]
        page.append(f"<p><b>{html.escape(rel)}</b>: {html.escape(what)}<br><img src='{html.escape(rel)}'><br>"
                    f"<code>{html.escape(command)}</code></p>")
    text, index = demo.out / "README.txt", demo.out / "index.html"
    atomic_write(text, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    atomic_write(index, lambda tmp: Path(tmp).write_text("\n".join(page) + "\n"))
    return text, index


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--images", type=Path, default=REPO / "scripts" / "demo_images")
    parser.add_argument("--steps", type=int, default=200, help="Steps of the short training run.")
    parser.add_argument("--train-extra", default="", help="Extra train-pixels options (later ones win).")
    a = parser.parse_args(argv)
    a.out, a.checkpoints, a.images = shown(a.out), shown(a.checkpoints), shown(a.images)
    start = time.perf_counter()
    (a.out / "shipped").mkdir(parents=True, exist_ok=True)
    demo = Demo(a.out)
    show_shipped(demo, a.checkpoints, a.images)
    show_guided(demo, a.checkpoints)
    train_here(demo, a.steps, shlex.split(a.train_extra))
    text, index = write_index(demo, time.perf_counter() - start)
    print(f"\n{len(demo.entries)} pictures in {a.out}; which is which: {text} (or open {index})")
    if demo.failed:
        print(f"{len(demo.failed)} command(s) failed: {', '.join(demo.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
