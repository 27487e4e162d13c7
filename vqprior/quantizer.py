"""The VQ-VAE's vector quantizer: nearest-code assignment, the EMA codebook update, dead-code restarts, and the
codebook usage/perplexity measures. The codebook is a set of buffers changed only by ``init_codebook`` and
``update_codebook`` (never inside ``forward``), so an evaluation pass cannot change the model; in a distributed run
the random choices are broadcast from rank 0 and the statistics all-reduced, so every rank keeps the same codebook.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def measure_codes(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Codebook usage (fraction of codes used at least once) and perplexity (exp of the code entropy)."""
    return counts_to_usage(torch.bincount(codes.reshape(-1).long(), minlength=num_codes))


def counts_to_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage and perplexity from per-code assignment counts (K,)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(entropy))}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization to a codebook kept by EMA (buffers ``embedding`` (K, D), ``cluster_size``
    (K,), ``embed_avg`` (K, D)). Gradients pass straight through to the encoder; the commitment loss pulls encoder
    outputs towards their codes."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, commitment: float = 0.25,
                 dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.commitment = num_codes, dim, decay, commitment
        self.dead_code_threshold, self.eps = dead_code_threshold, eps
        embedding = torch.randn(num_codes, dim)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_avg", embedding.clone())

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) int64 index of the nearest code (squared Euclidean distance, in fp32)."""
        with torch.autocast(flat.device.type, enabled=False):
            flat = flat.float()
            dist2 = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embedding.t()
                     + self.embedding.pow(2).sum(1)[None])
            return dist2.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (B, h, w) -> code vectors (B, D, h, w)."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize encoder outputs (B, D, h, w). Returns the straight-through quantized map, the codes (B, h, w),
        the weighted commitment loss and ``inputs`` (N, D) (detached) for ``update_codebook``."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        codes = self.nearest(flat.detach())
        q = self.lookup(codes.view(B, h, w)).to(z.dtype)
        commitment = self.commitment * F.mse_loss(z.float(), q.detach().float())
        quantized = z + (q - z).detach()  # straight-through estimator
        return {"quantized": quantized, "codes": codes.view(B, h, w), "commitment": commitment,
                "inputs": flat.detach()}

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """Set the codebook to encoder outputs (B, D, h, w) of one batch, so every code starts near the data."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        if flat.shape[0] >= self.num_codes:
            picks = flat[torch.randperm(flat.shape[0], device=flat.device)[:self.num_codes]]
        else:  # fewer vectors than codes: repeat with a little noise so the codes differ
            picks = flat[torch.randint(flat.shape[0], (self.num_codes,), device=flat.device)]
            picks = picks + 0.01 * picks.std().clamp_min(1e-3) * torch.randn_like(picks)
        _broadcast(picks)
        self.embedding.copy_(picks)
        self.embed_avg.copy_(picks)
        self.cluster_size.fill_(1.0)

    @torch.no_grad()
    def update_codebook(self, inputs: torch.Tensor, codes: torch.Tensor) -> int:
        """EMA update from one batch's encoder outputs (N, D) and their codes; then restart dead codes.
        Returns the number of restarted codes. A batch with non-finite inputs is ignored (the step is skipped)."""
        inputs = inputs.float().reshape(-1, self.dim)
        codes = codes.reshape(-1)
        if not torch.isfinite(inputs).all():
            return 0
        counts = torch.bincount(codes, minlength=self.num_codes).to(inputs.dtype)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, codes, inputs)
        if dist.is_available() and dist.is_initialized():  # every rank's batch counts
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps a code with no assignments from dividing by zero.
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.copy_(self.embed_avg / smoothed[:, None])
        return self.restart_dead_codes(inputs)

    @torch.no_grad()
    def restart_dead_codes(self, inputs: torch.Tensor) -> int:
        """Move codes whose EMA count is below the threshold onto random encoder outputs of the batch. Their
        statistics restart at the threshold, so a restarted code survives only if it attracts vectors."""
        if self.dead_code_threshold <= 0 or inputs.shape[0] == 0:
            return 0
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return 0
        picks = inputs[torch.randint(inputs.shape[0], (num_dead,), device=inputs.device)].float()
        _broadcast(picks)
        self.embedding[dead] = picks
        self.embed_avg[dead] = picks * self.dead_code_threshold
        self.cluster_size[dead] = self.dead_code_threshold
        return num_dead


def _broadcast(t: torch.Tensor) -> None:
    """Keep random codebook choices identical on every rank of a distributed run."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, 0)


__all__ = ["VectorQuantizer", "measure_codes", "counts_to_usage"]
