"""``vqprior info`` (what is inside a checkpoint, a code cache or an image cache) and ``vqprior presets`` (the
fields and parameter counts of every architecture preset).

Both only read: ``info`` builds a checkpoint's model once to count its parameters (caches: ``vqprior.data.
cache_info``), ``presets`` prints the preset tables of ``vqprior.config``.
"""
from __future__ import annotations

import json
import textwrap

import click

from vqprior.commands.common import guarded

# The fields of a ModelConfig that a preset sets (the rest come from the data: size, channels, head, conditioning).
PIXELSNAIL_PRESET_FIELDS = ("filters", "blocks", "res_blocks", "kernel_size", "attention", "attn_heads",
                            "key_channels", "value_channels", "dropout", "mixtures", "embed_dim", "cond_channels",
                            "cond_layers")
VQVAE_PRESET_FIELDS = ("levels", "codebook_size", "embed_dim", "hidden", "res_blocks", "res_channels", "bottom_stride",
                       "top_stride", "decay", "commitment")


def _training(train: dict) -> dict:
    """The stored training config, with the effective batch (micro-batch x accumulation) spelled out."""
    if not train:
        return train
    return {**train, "effective_batch": int(train.get("batch_size", 0)) * int(train.get("grad_accum", 1))}


def _fields_text(values: dict, indent: str = "  ") -> str:
    """``{a: 1, b: 2}`` -> wrapped ``a=1, b=2`` lines (floats shortest-exact, so what is printed can be typed back)."""
    text = ", ".join(f"{k}={v}" for k, v in values.items()) or "(none)"
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def describe_checkpoint(data: dict) -> dict:
    """The facts ``info`` prints, as plain data (also its ``--json`` output)."""
    from vqprior.checkpoint import build_model

    model = build_model(data, use_ema=False)
    config = data.get("config", {})
    exported = "optimizer" not in data
    facts = {"kind": data["kind"], "step": int(data.get("step", 0)),
             "parameters": sum(p.numel() for p in model.parameters()),
             "file": "exported (inference only, cannot be resumed)" if exported
             else "training checkpoint (model, EMA weights, optimizer and RNG state: --resume continues it)",
             "storage_dtype": data.get("storage_dtype", "float32"),
             "vqprior_version": data.get("vqprior_version", ""), "format_version": data["format_version"],
             "architecture": config.get("model", {}), "training": _training(config.get("train", {})),
             "data": config.get("data", {}), "metrics": dict(data.get("metrics", {}))}
    if data["kind"] == "vqvae":
        facts["levels"] = _levels(model)
    if data["kind"] == "prior":
        facts["prior"] = config.get("prior", {})
        vq = getattr(model, "vqvae", None)
        facts["vqvae"] = None if vq is None else {
            "sha256": data["vqvae"].get("sha256", ""), "parameters": sum(p.numel() for p in vq.parameters()),
            "architecture": data["vqvae"]["config"].get("model", {}),
            "data": data["vqvae"]["config"].get("data", {}), "levels": _levels(vq)}
    return facts


def _levels(vq) -> list[dict]:
    """A VQ-VAE's levels, coarsest first: name and image pixels per code (per side)."""
    return [{"level": name, "stride": stride} for name, stride in zip(vq.level_names, vq.config.level_strides())]


def _levels_text(levels: list[dict]) -> str:
    return ", ".join(f"{lv['level']} (1 code per {lv['stride']}x{lv['stride']} pixels)" for lv in levels)


def _cache_text(facts: dict) -> list[str]:
    """The lines ``info`` prints for one cache (``vqprior.data.cache_info`` facts)."""
    size = f"{facts['bytes'] / 2**20:,.1f} MiB in use, {facts['bytes_per_item'] / 1024:,.1f} KiB per item"
    if facts["kind"] == "code cache":
        levels = ", ".join(f"{lv['level']} {lv['shape'][0]}x{lv['shape'][1]} ({lv['codebook_size']} codes)"
                           for lv in facts["levels"])
        return [f"{facts['path']}: code cache, {facts['count']:,} code maps, complete",
                f"levels: {levels}", f"classes: {facts['num_classes'] or 'none (unlabelled)'}",
                f"source VQ-VAE sha256: {facts['vqvae_sha256']}", "built from:", _fields_text(facts["built_from"]),
                f"format {facts['format_version']}; {size}"]
    c, h, w = facts["shape"]
    state = ("complete" if facts["complete"] else
             f"UNFINISHED: {facts['written']:,} of {facts['count']:,} written; building it again resumes")
    return [f"{facts['path']}: image cache, {facts['count']:,} images of {c}x{h}x{w} stored as {facts['encoding']}, "
            f"{state}", f"classes: {facts['num_classes'] or 'none (unlabelled)'}", "built from:",
            _fields_text(facts["built_from"]), f"format {facts['format_version']}; {size}"]


@click.command("info")
@click.argument("checkpoint", metavar="CKPT", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as one JSON object.")
@guarded
def info(checkpoint, as_json):
    """Print what CKPT is: kind, step, parameter count, the architecture, training and data configs, the last
    metrics and, for priors, the embedded VQ-VAE. Works on training checkpoints and exports alike.

    CKPT may also be a cache folder: a code cache (extract-codes --out: count, level shapes, codebook sizes,
    classes, the source VQ-VAE's sha256, what it was built from), an image cache environment or a --cache folder
    of them (count, shape, encoding, classes, what it was built from, complete or how far an interrupted build got).
    """
    from pathlib import Path

    from vqprior.checkpoint import read_checkpoint

    if Path(checkpoint).is_dir():
        from vqprior.data.cache_info import describe_cache

        caches = describe_cache(checkpoint)
        if as_json:
            click.echo(json.dumps(caches[0] if len(caches) == 1 and (Path(checkpoint) / "data.mdb").is_file()
                                  else caches, indent=2, sort_keys=True))
        else:
            click.echo("\n".join(line for facts in caches for line in _cache_text(facts)))
        return
    data = read_checkpoint(checkpoint, upcast=False)  # as stored: the file's weight dtype is one of the facts
    facts = describe_checkpoint(data)
    if as_json:
        click.echo(json.dumps(facts, indent=2, sort_keys=True, default=str))
        return
    lines = [f"{checkpoint}: {facts['kind']} checkpoint, step {facts['step']}, {facts['parameters']:,} parameters",
             f"file: {facts['file']}",
             f"weights stored as {facts['storage_dtype']}; written by vqprior {facts['vqprior_version']}, "
             f"checkpoint format {facts['format_version']}"]
    classes = int(facts["architecture"].get("num_classes", 0) or 0)
    if classes:
        null = ("with a null class (p(x) too: sample --guidance, evaluate --class none)"
                if facts["architecture"].get("null_class") else "without a null class (no --guidance)")
        lines.append(f"class-conditional over {classes} classes, {null}")
    if facts["data"].get("perturb"):
        lines.append(f"background model: trained with {facts['data']['perturb']} of the sub-pixels replaced by "
                     f"uniform noise (score --background)")
    if "levels" in facts:
        lines.append(f"levels, coarsest first: {_levels_text(facts['levels'])}")
    sections = [("architecture", facts["architecture"]), ("training", facts["training"]), ("data", facts["data"])]
    if "prior" in facts:
        sections.append(("prior", facts["prior"]))
    metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in sorted(facts["metrics"].items())}
    sections.append(("last metrics", metrics))
    for title, values in sections:
        lines += [f"{title}:", _fields_text(values)]
    if "vqvae" in facts:
        vq = facts["vqvae"]
        if vq is None:
            lines.append("embedded VQ-VAE: none")
        else:
            lines += [f"embedded VQ-VAE: {vq['parameters']:,} parameters, sha256 {vq['sha256']}",
                      f"  levels, coarsest first: {_levels_text(vq['levels'])}",
                      "  architecture:", _fields_text(vq["architecture"], "    "),
                      "  data:", _fields_text(vq["data"], "    ")]
    click.echo("\n".join(lines))


@click.command("presets")
@guarded
def presets():
    """List every architecture preset, its parameter count and the fields it sets (PixelSNAIL for train-pixels /
    train-prior, VQ-VAE for train-vqvae). Every field can be overridden by the option of the same name in kebab-case.
    Counts depend on the data (head, codebook, conditioning): each is given for the use the preset is named for."""
    from vqprior.config import DEFAULT_PRESET_USE, PRESET_USES, PRESETS, model_config_from_preset
    from vqprior.models.pixelsnail import count_parameters
    from vqprior.models.vqvae import VQVAE, VQVAE_PRESETS, vqvae_config_from_preset

    lines = ["PixelSNAIL presets (train-pixels, train-prior --preset):"]
    for name in PRESETS:
        use, data = PRESET_USES.get(name, DEFAULT_PRESET_USE)
        config = model_config_from_preset(name, **data)
        lines += [f"  {name}: {count_parameters(config):,} parameters as a {use}",
                  _fields_text({k: config.to_dict()[k] for k in PIXELSNAIL_PRESET_FIELDS}, "    ")]
    lines.append("VQ-VAE presets (train-vqvae --preset):")
    for name in VQVAE_PRESETS:
        config = vqvae_config_from_preset(name)
        count = sum(p.numel() for p in VQVAE(config).parameters())
        lines += [f"  {name}: {count:,} parameters ({config.levels} level(s), RGB)",
                  _fields_text({k: config.to_dict()[k] for k in VQVAE_PRESET_FIELDS}, "    ")]
    click.echo("\n".join(lines))
