"""Held-out likelihood: total negative log-likelihood in nats over a split, reported as bits/dim (pixels) or
bits/code (priors). bits = total NLL nats / (ln 2 * number of modelled values). ``ClassMarginal`` scores a
class-conditional model as the unconditional density it defines; ``NullClass`` scores the unconditional density a
model trained with a null class learnt directly (vqprior.models.null_class)."""
from __future__ import annotations

import math

import torch

from vqprior.errors import InputError


def bits_per_dim(total_nats: float, num_values: int) -> float:
    """Total NLL in nats over ``num_values`` modelled values (pixels x channels, or codes) -> bits per value."""
    return total_nats / (math.log(2.0) * num_values)


@torch.no_grad()
def evaluate_nll(model, loader, device="cpu", key: str = "image", condition_key: str | None = None,
                 use_label: bool = False, limit: int = 0, progress: bool = False) -> dict[str, float]:
    """Sum ``-model.log_prob`` over a loader of dict batches. Returns total nats, values, examples and bits/value.

    ``model`` is anything with ``log_prob(x, condition=None, label=None) -> (B, H, W)`` nats (so a plain uniform
    model can be evaluated the same way); ``limit`` > 0 stops after that many examples.
    """
    from tqdm import tqdm

    total_nats, values, examples = 0.0, 0, 0
    for batch in tqdm(loader, disable=not progress, desc="evaluate", unit="batch", dynamic_ncols=True):
        x = batch[key].to(device)
        if limit and examples + x.shape[0] > limit:
            x = x[:limit - examples]
        n = x.shape[0]
        label = batch["label"][:n].to(device) if use_label else None
        condition = batch[condition_key][:n].to(device) if condition_key else None
        log_prob = model.log_prob(x, condition=condition, label=label).double()
        total_nats -= float(log_prob.sum())
        values += int(x[0].numel()) * n
        examples += n
        if limit and examples >= limit:
            break
    if examples == 0:
        raise InputError("nothing to evaluate: the split is empty")
    return {"nll_nats": total_nats, "values": values, "examples": examples,
            "bits_per_value": bits_per_dim(total_nats, values)}


class ClassMarginal:
    """A class-conditional model read as an unconditional one: p(x) = sum_y p(y) p(x | y) with p(y) uniform over
    its classes. One pass per class, combined by logsumexp in float64; the sum's own term for any single y gives
    -log2 p(x) <= -log2 p(x | y) + log2(classes), so the marginal is never worse than that bound. Anything
    ``evaluate_nll`` takes: ``log_prob`` returns (B,) nats per example and ignores the labels it is given."""

    def __init__(self, model):
        self.num_classes = int(model.config.num_classes)
        if not self.num_classes:
            raise InputError("the model is not class-conditional: there are no classes to marginalise over")
        self.model = model

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, condition=None, label=None) -> torch.Tensor:
        per_class = []
        for y in range(self.num_classes):
            labels = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
            per_class.append(self.model.log_prob(x, condition=condition, label=labels).double().flatten(1).sum(1))
        return torch.logsumexp(torch.stack(per_class, 1), 1) - math.log(self.num_classes)


class NullClass:
    """A model trained with a null class read as the unconditional p(x) it learnt: every item scored given the null
    label, whatever its own label (one pass). Anything ``evaluate_nll`` takes, like ``ClassMarginal``."""

    def __init__(self, model):
        from vqprior.models.null_class import null_label

        self.null = null_label(model.config, "scoring p(x) with the null class")
        self.model = model

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, condition=None, label=None) -> torch.Tensor:
        labels = torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device)
        return self.model.log_prob(x, condition=condition, label=labels)
