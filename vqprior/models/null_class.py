"""The null class of a class-conditional model (classifier-free guidance, Ho & Salimans 2022; docs/guidance.md).

A model with ``ModelConfig.null_class`` has one more row in each class embedding: label ``num_classes`` means "no
class". Trained with ``DataConfig.class_dropout`` = P, each training label is replaced by it with probability P, so
the one network is both p(x | y) (labels 0..num_classes-1) and p(x) (the null label). This module owns the label
replacement, the null label itself and the weight surgery that gives a model trained without a null class one
(``--init-from``); guided sampling is ``vqprior.sampling.guidance``.
"""
from __future__ import annotations

import torch

from vqprior.config import ModelConfig
from vqprior.errors import InputError, UserError

EMBEDDING_SUFFIX = "class_embedding.weight"  # the per-block class biases of layers.GatedResBlock


def null_label(config: ModelConfig, why: str = "this") -> int:
    """The label of the null class; a one-line UserError when the model has none (``why`` names what needs it)."""
    if not config.num_classes:
        raise UserError(f"{why} needs a class-conditional model trained with a null class; this model has no classes")
    if not config.null_class:
        raise UserError(f"{why} needs a model trained with a null class (train-pixels / train-prior --class-dropout, "
                        f"or fine-tune this one with --init-from and --class-dropout); this model has none")
    return config.num_classes


def drop_labels(label: torch.Tensor | None, config: ModelConfig, probability: float) -> torch.Tensor | None:
    """``label`` with each entry replaced by the null label with ``probability`` (draws from the global RNG, like
    dropout, so a resumed run continues the same stream). Unchanged when ``probability`` is 0."""
    if label is None or not probability:
        return label
    if not config.null_class:
        raise InputError("class dropout needs a model with a null class (ModelConfig.null_class)")
    drop = torch.rand(label.shape, device=label.device) < probability
    return torch.where(drop, torch.full_like(label, config.num_classes), label)


def add_null_class(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of a model trained without a null class (``config``) made to fit the same model with one:
    every class embedding gets a null row equal to the mean of its class rows.

    Why the mean: each row is a per-block bias that the rest of the network co-adapted with during training. The
    mean bias keeps the null input inside the range of inputs the network has seen, so fine-tuning starts p(x) near
    an average of the class-conditionals (whose mixture p(x) is) rather than at the untrained all-zero bias, which
    the trained network never received.
    """
    if config.null_class or not config.num_classes:
        raise InputError("add_null_class takes the weights of a class-conditional model without a null class")
    out = dict(weights)
    for name, w in weights.items():
        if name.endswith(EMBEDDING_SUFFIX):
            if w.shape[0] != config.num_classes:
                raise InputError(f"{name} has {w.shape[0]} rows, expected {config.num_classes}")
            out[name] = torch.cat([w, w.mean(0, keepdim=True)], 0)
    return out
