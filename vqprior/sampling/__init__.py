"""Sampling: ``sample`` and ``complete`` (the naive reference loop and the exact cached one), the cached sampler's
per-layer state, classifier-free guidance, and ``generate`` (checkpoint models -> images through the whole
hierarchy, decoded).

May import models, runtime and the top-level modules (config, errors, levels, images); never data, training,
evaluation or compress.
"""
from vqprior.sampling.sampler import complete, sample

__all__ = ["sample", "complete"]
