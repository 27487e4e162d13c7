"""Receptive fields of PixelSNAIL (the paper's Figures 6-9): which input positions one output position depends on.

``compute_receptive_field`` returns |d sum(head parameters at p) / d raw input| summed over input channels, computed
exactly (float64 copy, eval mode) so that a position the network cannot see has a gradient of exactly zero: a blind
spot of the convolution stack shows up as a true zero, not as a small number. ``render_receptive_field`` draws that
map as a heat image; ``combine_panels`` puts labelled panels side by side for comparisons (e.g. with and without
attention). No CLI code here: ``vqprior receptive-field`` (commands/receptive_field.py) drives these functions.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from vqprior.errors import InputError
from vqprior.models.pixelsnail import PixelSNAIL

# Colours (RGB) that the heat ramp (black -> red -> yellow -> white) never produces.
TARGET_RGB = (0, 200, 255)  # the output position whose receptive field is drawn
FUTURE_RGB = (28, 32, 64)  # later positions with zero gradient: unreachable by design, not a blind spot
DECADES = 6.0  # log-scale dynamic range of the heat map; anything smaller is drawn at the dimmest non-zero colour


@dataclass(frozen=True)
class ReceptiveFieldSummary:
    """Counts of earlier (strictly before p in raster order) and later positions with a non-zero gradient."""

    earlier: int  # positions before p
    earlier_reached: int  # ... with a non-zero gradient
    later_reached: int  # positions at or after p with a non-zero gradient (0 for a causal model)

    @property
    def blind(self) -> int:
        """Earlier positions the output cannot see (blind spots)."""
        return self.earlier - self.earlier_reached


def copy_model_float64(model: PixelSNAIL) -> PixelSNAIL:
    """An eval-mode float64 copy of a PixelSNAIL on the CPU, without parameter gradients; the caller's model is left
    untouched. Modules attached outside the module tree (a prior's VQ-VAE) are shared, not copied."""
    attached = {id(value): value for value in vars(model).values() if isinstance(value, torch.nn.Module)}
    net = copy.deepcopy(model, memo=attached).to(device="cpu", dtype=torch.float64)
    # Only the input gradient is wanted: skipping the weight gradients roughly halves the backward pass.
    return net.requires_grad_(False).eval()


def compute_receptive_field(model: PixelSNAIL, position: tuple[int, int], height: int | None = None,
                            width: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """|d sum(params at ``position``) / d raw input| summed over input channels: float64 (H, W) on the CPU.

    The raw input is a random map requiring grad: pixels uniform in [-1, 1] of shape (1, C, H, W), or for a code
    prior the embeddings of random codes. A class-conditional model gets label 0 and a bottom prior random top
    codes. ``height`` / ``width`` default to the model's configured size (the network is convolutional, so other
    sizes work too).
    """
    c = model.config
    H, W = height or c.height, width or c.width
    r, col = position
    if not (0 <= r < H and 0 <= col < W):
        raise InputError(f"position ({r}, {col}) is outside the {H}x{W} map")
    net = copy_model_float64(model)
    with torch.no_grad():
        if c.head == "pixels":
            raw = torch.rand(1, c.channels, H, W, generator=generator, dtype=torch.float64) * 2 - 1
        else:
            raw = net.embed_input(torch.randint(0, c.num_codes, (1, H, W), generator=generator))
    raw = raw.detach().requires_grad_()
    label = torch.zeros(1, dtype=torch.long) if c.num_classes else None
    condition = (torch.randint(0, c.cond_num_codes, (1, c.cond_height, c.cond_width), generator=generator)
                 if c.cond_num_codes else None)
    params = net.forward_raw(raw, label=label, condition=condition)  # (1, P, H, W)
    params[0, :, r, col].sum().backward()
    return raw.grad[0].abs().sum(0)  # (H, W)


def summarize_receptive_field(grad_map: torch.Tensor, position: tuple[int, int]) -> ReceptiveFieldSummary:
    """How many earlier positions reach ``position`` and whether any later one does (it must not)."""
    H, W = grad_map.shape
    p = position[0] * W + position[1]
    nonzero = (grad_map != 0).flatten()
    return ReceptiveFieldSummary(earlier=p, earlier_reached=int(nonzero[:p].sum()),
                                 later_reached=int(nonzero[p:].sum()))


def _heat_ramp(t: torch.Tensor) -> torch.Tensor:
    """t in [0, 1] (...,) -> RGB in [0, 1] (..., 3): black -> red -> yellow -> white."""
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], -1)


def render_receptive_field(grad_map: torch.Tensor, position: tuple[int, int], scale: int | None = None) -> torch.Tensor:
    """A gradient map (H, W) -> uint8 heat map (3, H*s, W*s).

    Log-scaled over ``DECADES`` decades below the maximum; exact zeros are black among earlier positions (blind
    spots) and dark blue among later ones (causally excluded); the target position is cyan. ``scale`` (the integer
    upscaling factor) defaults to the smallest one giving at least 256 pixels on the longer side.
    """
    H, W = grad_map.shape
    g = grad_map.detach().to(torch.float64).cpu()
    rgb = torch.zeros(H, W, 3, dtype=torch.float64)
    nonzero = g > 0
    if nonzero.any():
        log_g = torch.log10(g.clamp_min(1e-300))
        top = log_g[nonzero].max()
        # The dimmest non-zero value still gets a visible colour (0.15), so zero and "tiny" never look alike.
        t = 0.15 + 0.85 * ((log_g - top) / DECADES + 1).clamp(0, 1)
        rgb[nonzero] = _heat_ramp(t[nonzero])
    image = (rgb * 255).round().to(torch.uint8)
    p = position[0] * W + position[1]
    later_zero = (torch.arange(H * W).view(H, W) > p) & ~nonzero
    image[later_zero] = torch.tensor(FUTURE_RGB, dtype=torch.uint8)
    image[position[0], position[1]] = torch.tensor(TARGET_RGB, dtype=torch.uint8)
    s = scale or max(1, math.ceil(256 / max(H, W)))
    image = image.permute(2, 0, 1)  # (3, H, W)
    return image.repeat_interleave(s, 1).repeat_interleave(s, 2).contiguous()


def combine_panels(panels: list[tuple[str, torch.Tensor]], gap: int = 12, label_height: int = 18) -> torch.Tensor:
    """Labelled uint8 (3, h, w) panels side by side on a white background, label above each: uint8 (3, H', W')."""
    from PIL import Image, ImageDraw

    height = max(p.shape[1] for _, p in panels)
    width = sum(p.shape[2] for _, p in panels) + gap * (len(panels) + 1)
    canvas = torch.full((3, height + label_height + 2 * gap, width), 255, dtype=torch.uint8)
    x = gap
    for _, panel in panels:
        canvas[:, label_height + gap:label_height + gap + panel.shape[1], x:x + panel.shape[2]] = panel
        x += panel.shape[2] + gap
    image = Image.fromarray(canvas.permute(1, 2, 0).numpy().copy())
    draw = ImageDraw.Draw(image)
    x = gap
    for label, panel in panels:
        draw.text((x, gap // 2 + 2), label, fill=(0, 0, 0))
        x += panel.shape[2] + gap
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def without_attention(model: PixelSNAIL) -> PixelSNAIL:
    """A freshly initialised PixelSNAIL with the same config but no attention (the convolution-only stack)."""
    return PixelSNAIL(replace(model.config, attention=False))


__all__ = ["ReceptiveFieldSummary", "compute_receptive_field", "summarize_receptive_field", "render_receptive_field",
           "combine_panels", "copy_model_float64", "without_attention", "TARGET_RGB", "FUTURE_RGB"]
