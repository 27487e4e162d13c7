"""The pixel-level density task: PixelSNAIL with a logistic-mixture head trained on images (bits/dim)."""
from __future__ import annotations

import math

import torch

from vqprior.config import DataConfig, ModelConfig
from vqprior.evaluation.likelihood import evaluate_nll
from vqprior.models.layers import data_dependent_init
from vqprior.models.null_class import drop_labels
from vqprior.models.pixelsnail import PixelSNAIL


class PixelTask:
    """Train-loop task (see ``vqprior.training.loop``) for ``PixelSNAIL`` over uint8 images."""

    kind = "pixels"

    def __init__(self, model_config: ModelConfig, data_config: DataConfig):
        if model_config.head != "pixels":
            raise ValueError("PixelTask needs a model config with head='pixels'")
        self.model_config, self.data_config = model_config, data_config

    def _label(self, batch):
        return batch["label"] if self.model_config.num_classes else None

    def build_model(self) -> PixelSNAIL:
        return PixelSNAIL(self.model_config)

    def init_model(self, model, batch) -> None:
        data_dependent_init(model, batch["image"], label=self._label(batch))

    def loss(self, model, batch):
        x = perturb_images(batch["image"], self.data_config.perturb)  # a background model's noisy inputs
        label = drop_labels(self._label(batch), self.model_config, self.data_config.class_dropout)  # null class
        params = model(x, label=label)
        head = getattr(model, "module", model).head  # DistributedDataParallel keeps PixelSNAIL in .module
        log_prob = head.log_prob(params.float(), x)  # the likelihood in fp32 even under bf16 autocast
        nats_per_dim = -log_prob.sum((1, 2)).mean() / x[0].numel()
        return nats_per_dim, {"bpd": nats_per_dim.detach() / math.log(2.0)}  # read at logging steps only

    def evaluate(self, model, loader) -> dict[str, float]:
        device = next(model.parameters()).device
        result = evaluate_nll(model, loader, device, use_label=bool(self.model_config.num_classes))
        return {"bpd": result["bits_per_value"]}

    def grid(self, model, batch, generator) -> torch.Tensor:
        from vqprior.sampling.sampler import sample

        n = batch["image"].shape[0]
        label = torch.arange(n, device=batch["image"].device) % self.model_config.num_classes \
            if self.model_config.num_classes else None
        return sample(model, n, method="cached", generator=generator, label=label)

    def config_dicts(self) -> dict:
        return {"model": self.model_config.to_dict(), "data": self.data_config.to_dict()}

    def extra_checkpoint(self) -> dict:
        return {}


def perturb_images(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """uint8 ``images`` with each sub-pixel replaced, with probability ``fraction``, by a uniform random value 0..255
    (the input perturbation of Ren et al. 2019's background model). Draws from the global RNG of the images' device,
    like dropout, so a resumed run continues the same stream. Unchanged when ``fraction`` is 0."""
    if not fraction:
        return images
    replace = torch.rand(images.shape, device=images.device) < fraction
    noise = torch.randint(0, 256, images.shape, device=images.device, dtype=images.dtype)
    return torch.where(replace, noise, images)
