"""The VQ-VAE training task for the generic trainer (``vqprior.training.loop``): loss plus the explicit EMA codebook
update, held-out reconstruction metrics (MSE and PSNR on the 0..255 scale, codebook usage and perplexity per
level) and the reconstruction grid (originals above, reconstructions below)."""
from __future__ import annotations

import torch

from vqprior.config import DataConfig
from vqprior.errors import InputError
from vqprior.evaluation.metrics import psnr_from_mse
from vqprior.models.quantizer import code_perplexity, counts_to_usage
from vqprior.models.vqvae import VQVAE, VQVAEConfig

PIXEL_SCALE = 127.5  # model range [-1, 1] -> 0..255


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the VQVAE in .module


class VQVAETask:
    """Train-loop task for ``VQVAE`` over dict batches {"image": uint8 (B, C, H, W), "label", "index"}."""

    kind = "vqvae"
    grid_nrow = 8  # set by ``grid`` to the number of originals, so they fill the top row(s)

    def __init__(self, model_config: VQVAEConfig, data_config: DataConfig):
        self.model_config, self.data_config = model_config, data_config

    def build_model(self) -> VQVAE:
        return VQVAE(self.model_config)

    def init_model(self, model, batch) -> None:
        _unwrap(model).init_codebooks(batch["image"])

    def loss(self, model, batch):
        """The loss and the step's metrics as 0-d device tensors (read by the loop at logging steps only)."""
        out = model(batch["image"])
        _unwrap(model).update_codebooks(out)  # after the loss, under no_grad: forward never touches the codebooks
        vq = _unwrap(model)
        recon_loss = out["recon_loss"].detach()
        metrics = {"loss": out["loss"].detach(), "recon_loss": recon_loss, "mse": recon_loss * PIXEL_SCALE ** 2,
                   "commitment": out["commitment"].detach()}
        for name, codes in zip(vq.level_names, out["codes"]):
            metrics[f"perplexity_{name}"] = code_perplexity(codes, vq.config.codebook_size)
        return out["loss"], metrics

    @torch.no_grad()
    def evaluate(self, model, loader) -> dict[str, float]:
        """Whole-split metrics: MSE of the uint8 reconstructions (0..255 scale), PSNR of that MSE, and per level
        the fraction of codes used and the perplexity of the code histogram."""
        vq = _unwrap(model)
        device = vq.pre_quant.weight.device
        K = vq.config.codebook_size
        sq_err, values = 0.0, 0
        counts = [torch.zeros(K, dtype=torch.long, device=device) for _ in vq.level_names]
        for batch in loader:
            images = batch["image"].to(device)
            out = vq(images)
            recon = torch.round((out["recon"].float().clamp(-1, 1) + 1.0) * PIXEL_SCALE)
            sq_err += float((recon.double() - images.double()).pow(2).sum())
            values += images.numel()
            for i, codes in enumerate(out["codes"]):
                counts[i] += torch.bincount(codes.reshape(-1), minlength=K)
        if values == 0:
            raise InputError("nothing to evaluate: the split is empty")
        mse = sq_err / values
        result = {"mse": mse, "psnr": psnr_from_mse(mse)}
        for name, c in zip(vq.level_names, counts):
            usage = counts_to_usage(c)
            result[f"usage_{name}"] = usage["usage"]
            result[f"perplexity_{name}"] = usage["perplexity"]
        return result

    @torch.no_grad()
    def grid(self, model, batch, generator) -> torch.Tensor:
        """Up to 8 originals in the top row, their reconstructions in the row below (``generator`` is unused:
        reconstruction is deterministic)."""
        vq = _unwrap(model)
        originals = batch["image"][:8].to(vq.pre_quant.weight.device)
        self.grid_nrow = originals.shape[0]
        return torch.cat([originals, vq.reconstruct(originals)], 0)

    def config_dicts(self) -> dict:
        return {"model": self.model_config.to_dict(), "data": self.data_config.to_dict()}

    def extra_checkpoint(self) -> dict:
        return {}
