"""Checkpoints: one ``.pt`` file of plain data, written atomically, read with ``weights_only=True``.

Layout (docs/design.md section 6)::

    format_version  int                 FORMAT_VERSION
    kind            "pixels" | "prior" | "vqvae"
    vqprior_version str
    config          {"model": {...}, "train": {...}, "data": {...}, ...}   plain dicts
    model, ema      state dicts (the unwrapped module; no "module." / "_orig_mod." prefixes)
    optimizer       optimizer state dict (absent in exported checkpoints)
    step            int
    rng             {"torch": ByteTensor, "cuda": ByteTensor of the training GPU (CUDA runs only; older
                    checkpoints hold a list, one per visible GPU)}
    scaler          fp16 runs: torch.amp.GradScaler state (scale, growth tracker, factors)
    metrics         {name: float}
    vqvae           priors only: {"config": {...}, "weights": state dict, "sha256": str}
    storage_dtype   "float32" | "float16" (exported checkpoints may store floats in half precision)

Nothing here is pickled Python objects, so a tampered file cannot run code when loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vqprior import __version__
from vqprior.errors import UserError
from vqprior.io import atomic_write, torch_save_file

FORMAT_VERSION = 1
KINDS = ("pixels", "prior", "vqvae")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (must hold ``kind``) with the format header added."""
    if payload.get("kind") not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}")
    data = {"format_version": FORMAT_VERSION, "vqprior_version": __version__, "storage_dtype": "float32"}
    data.update(payload)
    atomic_write(path, lambda tmp: torch_save_file(data, tmp))


def read_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    upcast: bool = True) -> dict[str, Any]:
    """Read and validate a checkpoint; ``kind`` restricts which kinds are accepted. Errors are one-line UserErrors.
    fp16-stored weights come back as float32 unless ``upcast`` is False (then as stored, e.g. to describe the file)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"expected a checkpoint file, got a folder: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same user-facing problem
        text = str(e)
        reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        if "Unsupported global" in text or "GLOBAL" in text:
            reason = "it contains pickled Python objects, which are refused for safety"
        elif "central directory" in text or "zip archive" in text:
            reason = "the file is truncated or damaged"
        elif "weights_only" in text or "Weights only" in text:
            reason = "not a PyTorch checkpoint file"  # e.g. random bytes: torch's message is about pickles
        raise UserError(f"not a readable vqprior checkpoint: {path} ({reason[:160]})") from None
    if not isinstance(data, dict) or "format_version" not in data or "kind" not in data:
        raise UserError(f"not a vqprior checkpoint (no format header): {path}")
    if not isinstance(data["format_version"], int) or data["format_version"] > FORMAT_VERSION:
        raise UserError(f"checkpoint format {data['format_version']} is newer than this vqprior understands "
                        f"({FORMAT_VERSION}): {path}")
    wanted = (kind,) if isinstance(kind, str) else kind
    if wanted and data["kind"] not in wanted:
        raise UserError(f"{path} is a {data['kind']} checkpoint; expected {' or '.join(wanted)}")
    if upcast and data.get("storage_dtype") == "float16":
        data = _restore_float32(data)
    return data


def _restore_float32(data: dict[str, Any]) -> dict[str, Any]:
    def up(obj):
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.float16:
            return obj.float()
        if isinstance(obj, dict):
            return {k: up(v) for k, v in obj.items()}
        return obj

    out = {k: up(v) if k in ("model", "ema", "vqvae") else v for k, v in data.items()}
    out["storage_dtype"] = "float32"
    return out


# Config fields that record where files were on the training machine (data folder, image or code cache).
PROVENANCE_PATHS = ("data_dir", "cache", "codes", "vqvae_path")


def strip_paths(config: Any) -> Any:
    """``config`` with every provenance path emptied: the fields named in PROVENANCE_PATHS and any other string that
    is an absolute path. A shared file then names its dataset but no folder of the machine that trained it."""
    if isinstance(config, dict):
        return {k: "" if k in PROVENANCE_PATHS and isinstance(v, str) else strip_paths(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(strip_paths(v) for v in config)
    if isinstance(config, str) and (os.path.isabs(config) or config.startswith("~")):
        return ""
    return config


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, half: bool = True) -> None:
    """Write a small inference-only copy: EMA weights as the model, no optimizer state, no machine paths in its
    configs (``strip_paths``); floats in fp16 if ``half``. Exporting an export gives the same weights."""
    data = read_checkpoint(src)
    out = {k: v for k, v in data.items() if k not in ("optimizer", "ema", "rng", "scaler")}  # training state
    out["model"] = data.get("ema") or data["model"]
    out["config"] = strip_paths(data.get("config", {}))
    if "vqvae" in out:  # a prior's embedded VQ-VAE carries the configs of its own training run
        out["vqvae"] = {**out["vqvae"], "config": strip_paths(out["vqvae"].get("config", {}))}

    def down(obj):
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.float32:
            return obj.half()
        if isinstance(obj, dict):
            return {k: down(v) for k, v in obj.items()}
        return obj

    if half:
        out["model"] = down(out["model"])
        if "vqvae" in out:
            out["vqvae"] = down(out["vqvae"])
        out["storage_dtype"] = "float16"
    atomic_write(dst, lambda tmp: torch_save_file(out, tmp))


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint weights do not match its config: {path} ({first[:160]})") from None


def build_model(data: dict[str, Any], use_ema: bool = True, path: str = "<checkpoint>") -> torch.nn.Module:
    """Construct the checkpoint's model (PixelSNAIL or VQVAE) from its config and load its weights."""
    config = data.get("config", {})
    state = data.get("ema") if use_ema and data.get("ema") else data["model"]
    if data["kind"] in ("pixels", "prior"):
        from vqprior.config import ModelConfig
        from vqprior.models.pixelsnail import PixelSNAIL

        model = PixelSNAIL(ModelConfig.from_dict(config["model"]))
        _load_state(model, state, path)
        if data["kind"] == "prior" and "vqvae" in data:
            vq = data["vqvae"]
            attach_vqvae(model, build_model({"kind": "vqvae", "config": vq["config"], "model": vq["weights"]},
                                            use_ema=False, path=path), vq.get("sha256", ""))
        model.prior_info = dict(config.get("prior", {}))
        return model
    from vqprior.models.vqvae import VQVAE, VQVAEConfig

    model = VQVAE(VQVAEConfig.from_dict(config["model"]))
    _load_state(model, state, path)
    return model


def attach_vqvae(prior: torch.nn.Module, vqvae: torch.nn.Module, sha256: str = "") -> None:
    """Keep a prior's VQ-VAE beside it without registering it as a submodule (its weights are not the prior's)."""
    prior.__dict__["vqvae"] = vqvae
    prior.__dict__["vqvae_sha256"] = sha256


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", kind=None) -> torch.nn.Module:
    """Load a checkpoint's model in eval mode with EMA weights (a prior carries its VQ-VAE as ``model.vqvae``)."""
    data = read_checkpoint(path, kind)
    model = build_model(data, use_ema=True, path=str(path)).to(device).eval()
    if getattr(model, "vqvae", None) is not None:
        model.vqvae.to(device).eval()
    model.__dict__["checkpoint_kind"] = data["kind"]
    return model
