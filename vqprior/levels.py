"""The names and order of a VQ-VAE's levels, shared by the VQ-VAE, the code cache, the priors and the commands.

Levels are always listed coarsest first, as ``VQVAE.encode`` returns them: one level is ``("top",)``, two are
``("top", "bottom")`` (the VQ-VAE-2 pair, names kept from the first versions), three are ``("top", "middle",
"bottom")`` (the paper's FFHQ-1024 model), and N > 3 are ``("top", "middle1", ..., "middle{N-2}", "bottom")``.
Every level but the top one is modelled by a prior conditioned on the level directly above it.
"""
from __future__ import annotations

from vqprior.errors import InputError

MAX_LEVELS = 8  # codes sit bottom_stride * top_stride ** (levels - 1) pixels apart: 8 levels is already 512+


def level_names(levels: int) -> tuple[str, ...]:
    """The names of a ``levels``-level hierarchy, coarsest first."""
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise InputError(f"levels must be in [1, {MAX_LEVELS}], got {levels}")
    if levels == 1:
        return ("top",)
    if levels == 3:
        return ("top", "middle", "bottom")
    return ("top", *(f"middle{i}" for i in range(1, levels - 1)), "bottom")


def level_above(names: tuple[str, ...] | list[str], level: str) -> str | None:
    """The level a prior of ``level`` is conditioned on (the one directly above it), or None for the top level."""
    i = list(names).index(level)
    return names[i - 1] if i else None


def prior_levels(prior_info: dict, level: str) -> int:
    """How many levels the VQ-VAE of a prior checkpoint has, from its recorded ``prior`` config (checkpoints
    written before the field existed: 2 for a bottom prior, 1 otherwise)."""
    levels = prior_info.get("levels")
    return int(levels) if levels else (2 if level == "bottom" else 1)
