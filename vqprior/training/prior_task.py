"""The code-prior task for the generic trainer (``vqprior.training.loop``): a categorical PixelSNAIL over one level of a
VQ-VAE code cache (the top level, or a lower level conditioned on the codes of the level directly above it: the
bottom level on the top codes of a 2-level VQ-VAE, on the middle codes of a 3-level one), in nats / bits per code.

It also owns the glue between a prior and its VQ-VAE: the VQ-VAE payload a prior checkpoint embeds
(``load_vqvae_payload``), the prior config derived from a code cache (``prior_model_config``) and the checks that
cache, prior and VQ-VAE agree.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import torch

from vqprior.checkpoint import read_checkpoint
from vqprior.config import DataConfig, ModelConfig
from vqprior.data.codes import check_codebook, read_code_metadata
from vqprior.errors import UserError
from vqprior.evaluation.likelihood import evaluate_nll
from vqprior.io import file_sha256
from vqprior.levels import level_above, level_names
from vqprior.models.layers import data_dependent_init
from vqprior.models.null_class import drop_labels
from vqprior.models.pixelsnail import PixelSNAIL
from vqprior.models.vqvae import VQVAE, VQVAEConfig

LEVELS = ("top", "bottom")  # the levels of 1- and 2-level VQ-VAEs; 3+ add middle levels (``vqprior.levels``)


def load_vqvae_payload(path: str | os.PathLike) -> dict[str, Any]:
    """What a prior checkpoint embeds of its VQ-VAE: {"config": the VQ-VAE checkpoint's config dicts ({"model":
    VQVAEConfig dict, "data": ..., ...}, as ``checkpoint.build_model`` reads them), "weights": state dict (EMA when
    present), "sha256": the checkpoint file's sha256}."""
    data = read_checkpoint(path, "vqvae")
    config = data.get("config", {})
    vqvae_config(config)  # fail now, not when the prior is sampled
    weights = data.get("ema") or data["model"]
    return {"config": config, "weights": weights, "sha256": file_sha256(path)}


def vqvae_config(config: dict[str, Any]) -> VQVAEConfig:
    """The VQVAEConfig of a payload's config: checkpoint config dicts ({"model": ...}) or a bare VQVAEConfig dict."""
    if not isinstance(config, dict):
        raise UserError("the embedded VQ-VAE has no config")
    return VQVAEConfig.from_dict(config["model"] if "model" in config else config)


def build_vqvae(payload: dict[str, Any]) -> VQVAE:
    """The VQ-VAE of a payload, in eval mode."""
    model = VQVAE(vqvae_config(payload["config"]))
    try:
        model.load_state_dict(payload["weights"], strict=True)
    except RuntimeError as e:
        raise UserError(f"VQ-VAE weights do not match its config ({str(e).splitlines()[0][:160]})") from None
    return model.eval()


def cache_condition(cache_meta: dict[str, Any], level: str) -> dict[str, int]:
    """The ModelConfig condition fields of a prior of the cache's ``level``: codebook size and shape of the level
    directly above it (zeros for the top level)."""
    names = list(cache_meta["level_names"])
    above = level_above(names, level)
    if above is None:
        return dict(cond_num_codes=0, cond_height=0, cond_width=0)
    j = names.index(above)
    return dict(cond_num_codes=int(cache_meta["codebook_sizes"][j]), cond_height=int(cache_meta["shapes"][j][0]),
                cond_width=int(cache_meta["shapes"][j][1]))


def prior_model_config(base: ModelConfig, cache_meta: dict[str, Any], level: str,
                       class_conditional: bool = False) -> ModelConfig:
    """``base`` (e.g. a preset) with everything the code cache decides: codes head, codebook size, grid size, the
    condition on the level above (all but the top level) and the number of classes."""
    if level not in cache_meta["level_names"]:
        raise UserError(f"the code cache has no {level} level (it has {cache_meta['levels']} level(s): "
                        f"{', '.join(cache_meta['level_names'])})")
    i = list(cache_meta["level_names"]).index(level)
    (h, w), num_codes = cache_meta["shapes"][i], int(cache_meta["codebook_sizes"][i])
    cond = cache_condition(cache_meta, level)
    num_classes = int(cache_meta.get("num_classes", 0)) if class_conditional else 0
    if class_conditional and num_classes < 1:
        raise UserError("the code cache has no class labels, so the prior cannot be class-conditional")
    return replace(base, head="codes", num_codes=num_codes, height=int(h), width=int(w), num_classes=num_classes,
                   **cond)


def check_prior_against_cache(config: ModelConfig, cache_meta: dict[str, Any], level: str,
                              vqvae_sha256: str | None = None) -> None:
    """UserError (one line) unless the prior config fits the cache's ``level`` and the cache came from this VQ-VAE."""
    check_codebook(cache_meta, config.num_codes, level)
    i = list(cache_meta["level_names"]).index(level)
    if [config.height, config.width] != list(cache_meta["shapes"][i]):
        raise UserError(f"the prior models {config.height}x{config.width} code maps but the cache's {level} level "
                        f"is {cache_meta['shapes'][i][0]}x{cache_meta['shapes'][i][1]}")
    above = level_above(list(cache_meta["level_names"]), level)
    cond = cache_condition(cache_meta, level)
    if above is not None and [config.cond_num_codes, config.cond_height, config.cond_width] != list(cond.values()):
        raise UserError(f"the {level} prior's {above}-code condition does not match the cache's {above} level")
    if vqvae_sha256 and cache_meta.get("vqvae_sha256") and cache_meta["vqvae_sha256"] != vqvae_sha256:
        raise UserError(f"the code cache was extracted with a different VQ-VAE (sha256 "
                        f"{cache_meta['vqvae_sha256'][:12]}..., given {vqvae_sha256[:12]}...)")


def codes_to_images(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """int64 (B, h, w) codes -> uint8 grey (B, 1, h, w): a picture of the code map when no VQ-VAE is at hand."""
    return (codes.float() * (255.0 / max(num_codes - 1, 1))).round().to(torch.uint8).unsqueeze(1)


class PriorTask:
    """Train-loop task for a categorical ``PixelSNAIL`` over code-cache batches {"top", ..., "bottom", "label", ...}."""

    kind = "prior"

    def __init__(self, model_config: ModelConfig, data_config: DataConfig, level: str,
                 vqvae_payload: dict[str, Any] | None = None):
        if level not in LEVELS and not level.startswith("middle"):
            raise UserError(f"level must be top, middle(N) or bottom, got {level!r}")
        if model_config.head != "codes":
            raise UserError("a code prior needs a model config with head='codes'")
        self.model_config, self.data_config, self.level = model_config, data_config, level
        self.vqvae_payload = vqvae_payload
        self._vqvae: VQVAE | None = None
        self.cache_meta = read_code_metadata(data_config.cache) if data_config.cache else None
        if self.cache_meta is not None:
            check_prior_against_cache(model_config, self.cache_meta, level,
                                      vqvae_payload.get("sha256") if vqvae_payload else None)
            self.levels = int(self.cache_meta["levels"])
        elif vqvae_payload is not None:
            self.levels = vqvae_config(vqvae_payload["config"]).levels
        else:
            self.levels = 2 if level == "bottom" else 1
        self.level_names = level_names(self.levels)
        if level not in self.level_names:
            raise UserError(f"a {self.levels}-level VQ-VAE has no {level} level (it has "
                            f"{', '.join(self.level_names)})")
        self.condition_level = level_above(self.level_names, level)  # None for the top level
        if self.condition_level and not model_config.cond_num_codes:
            raise UserError(f"a {level} prior must be conditioned on the {self.condition_level} codes "
                            f"(cond_num_codes > 0)")

    # ---- batches ----------------------------------------------------------------------------------------------------
    def _inputs(self, batch):
        """(codes to model, condition or None, label or None) of a batch."""
        x = batch[self.level]
        condition = batch[self.condition_level] if self.condition_level else None
        label = batch["label"] if self.model_config.num_classes else None
        return x, condition, label

    def build_model(self) -> PixelSNAIL:
        return PixelSNAIL(self.model_config)

    def init_model(self, model, batch) -> None:
        x, condition, label = self._inputs(batch)
        data_dependent_init(model, x, label=label, condition=condition)

    def loss(self, model, batch):
        x, condition, label = self._inputs(batch)
        label = drop_labels(label, self.model_config, self.data_config.class_dropout)  # null class (guidance)
        logits = model(x, label=label, condition=condition)
        log_prob = getattr(model, "module", model).head.log_prob(logits.float(), x)  # fp32 even under bf16
        nats_per_code = -log_prob.sum((1, 2)).mean() / (x.shape[1] * x.shape[2])
        return nats_per_code, {"bits_per_code": nats_per_code.detach() / math.log(2.0)}  # read when logging

    def evaluate(self, model, loader) -> dict[str, float]:
        device = next(model.parameters()).device
        result = evaluate_nll(model, loader, device, key=self.level,
                              condition_key=self.condition_level,
                              use_label=bool(self.model_config.num_classes))
        return {"bits_per_code": result["bits_per_value"]}

    # ---- pictures ---------------------------------------------------------------------------------------------------
    def vqvae(self, device) -> VQVAE | None:
        if self.vqvae_payload is None:
            return None
        if self._vqvae is None:
            self._vqvae = build_vqvae(self.vqvae_payload)
        return self._vqvae.to(device)

    @torch.no_grad()
    def grid(self, model, batch, generator) -> torch.Tensor:
        """Samples of this level decoded through the VQ-VAE, one per batch item (its label / codes of the level
        above)."""
        from vqprior.sampling.sampler import sample

        x, condition, label = self._inputs(batch)
        codes = sample(model, x.shape[0], method="cached", generator=generator, label=label, condition=condition)
        vq = self.vqvae(codes.device)
        if vq is None:
            return codes_to_images(codes, self.model_config.num_codes)
        # The sampled level under (or over) the batch's real codes of every other level: a bottom prior's samples
        # under the real codes they were conditioned on; a top prior's sampled tops with the real lower levels,
        # which shows what the top codes control (global layout, colour). Not a full sample, which needs every
        # level's prior (``vqprior sample`` with all of them).
        return vq.decode([codes if name == self.level else batch[name] for name in self.level_names])

    def config_dicts(self) -> dict:
        return {"model": self.model_config.to_dict(), "data": self.data_config.to_dict(),
                "prior": {"level": self.level, "codes": self.data_config.cache, "levels": self.levels}}

    def extra_checkpoint(self) -> dict:
        return {"vqvae": self.vqvae_payload} if self.vqvae_payload is not None else {}
