"""The VQ-VAE's vector quantizer: nearest-code assignment, the EMA codebook update, dead-code restarts, and the
codebook usage/perplexity measures. The codebook is a set of buffers changed only by ``init_codebook`` and
``update_codebook`` (never inside ``forward``), so an evaluation pass cannot change the model; in a distributed run
the random choices are broadcast from rank 0 and the statistics all-reduced, so every rank keeps the same codebook
(DistributedDataParallel need not re-broadcast these buffers) and every rank makes the same collective calls.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def measure_codes(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Codebook usage (fraction of codes used at least once) and perplexity (exp of the code entropy)."""
    return counts_to_usage(torch.bincount(codes.reshape(-1).long(), minlength=num_codes))


def code_perplexity(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp of the entropy of the code histogram, as a 0-d tensor on the codes' device (no host sync: the training
    step logs it, and reads it only at logging steps)."""
    counts = torch.zeros(num_codes, device=codes.device).index_add_(
        0, codes.reshape(-1), torch.ones(codes.numel(), device=codes.device))
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


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
    def update_codebook(self, inputs: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """EMA update from one batch's encoder outputs (N, D) and their codes; then restart dead codes.

        Returns the number of restarted codes as a 0-d tensor on the codebook's device. Nothing here reads a value
        back to the host (the training step stays free of device syncs) and every rank of a distributed run takes
        the same collective path whatever its data: a batch with non-finite inputs on any rank is ignored on every
        rank (an all-reduced flag; the step is skipped), never by an early return that would leave the other
        ranks waiting in the all-reduce."""
        inputs = inputs.float().reshape(-1, self.dim)
        codes = codes.reshape(-1)
        # Counts by index_add_ rather than bincount: bincount sizes its output from the largest code (a host sync).
        counts = torch.zeros(self.num_codes + 1, device=inputs.device).index_add_(
            0, codes, torch.ones_like(codes, dtype=inputs.dtype))
        counts[-1] = (~torch.isfinite(inputs).all()).to(inputs.dtype)  # the non-finite flag travels with the counts
        sums = torch.zeros_like(self.embed_avg).index_add_(0, codes, inputs)
        if dist.is_available() and dist.is_initialized():  # every rank's batch counts
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        keep = counts[-1] == 0
        counts = counts[:-1]
        cluster_size = self.cluster_size * self.decay + counts * (1 - self.decay)
        embed_avg = self.embed_avg * self.decay + sums * (1 - self.decay)
        n = cluster_size.sum()
        # Laplace smoothing keeps a code with no assignments from dividing by zero.
        smoothed = (cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.cluster_size.copy_(torch.where(keep, cluster_size, self.cluster_size))
        self.embed_avg.copy_(torch.where(keep, embed_avg, self.embed_avg))
        self.embedding.copy_(torch.where(keep, embed_avg / smoothed[:, None], self.embedding))
        return self.restart_dead_codes(inputs, keep)

    @torch.no_grad()
    def restart_dead_codes(self, inputs: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Move codes whose EMA count is below the threshold onto random encoder outputs of the batch. Their
        statistics restart at the threshold, so a restarted code survives only if it attracts vectors.

        A candidate is drawn for every code and the dead ones take theirs (a masked update of fixed shape, so
        neither the number of dead codes nor their positions is read back to the host); ``keep`` False (a skipped
        batch) restarts nothing. Returns the number of restarted codes (0-d tensor)."""
        if self.dead_code_threshold <= 0 or inputs.shape[0] == 0:
            return torch.zeros((), device=self.embedding.device)
        dead = self.cluster_size < self.dead_code_threshold
        if keep is not None:
            dead &= keep
        picks = inputs[torch.randint(inputs.shape[0], (self.num_codes,), device=inputs.device)].float()
        _broadcast(picks)
        threshold = torch.full_like(self.cluster_size, self.dead_code_threshold)
        self.embedding.copy_(torch.where(dead[:, None], picks, self.embedding))
        self.embed_avg.copy_(torch.where(dead[:, None], picks * self.dead_code_threshold, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead, threshold, self.cluster_size))
        return dead.sum()


def _broadcast(t: torch.Tensor) -> None:
    """Keep random codebook choices identical on every rank of a distributed run."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, 0)


__all__ = ["VectorQuantizer", "measure_codes", "code_perplexity", "counts_to_usage"]
