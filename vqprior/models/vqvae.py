"""VQ-VAE (van den Oord et al., 2017) with one level or a VQ-VAE-2 style hierarchy (Razavi et al., 2019) of two or
more levels: top/bottom, or top, middle(s), bottom (names in ``vqprior.levels``).

This module owns the VQ-VAE: its config and presets and the encoder/decoder; the EMA vector quantizer is in
``vqprior.models.quantizer``. Public use:
``encode(uint8 images) -> [codes per level]`` ordered coarsest first ([top, bottom]; one element for one level),
``decode(codes) -> uint8 images``, ``code_shapes(H, W)``. Images are scaled to [-1, 1] internally.

The codebooks are buffers updated by exponential moving averages (decay 0.99) of the encoder outputs assigned to
each code; dead codes (EMA usage below a threshold) are restarted from the current batch's encoder outputs. These
updates never happen inside ``forward``: forward returns the statistics and ``update_codebooks`` applies them, so an
evaluation pass cannot change the model. The training task (``vqprior.training.vqvae_task``) calls it after each loss.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqprior.config import VQVAE_PRESETS, ConfigError, _strict_from_dict  # VQVAE_PRESETS re-exported
from vqprior.errors import InputError
from vqprior.levels import MAX_LEVELS, level_names
from vqprior.models.distributions import uint8_to_unit, unit_to_uint8
from vqprior.models.quantizer import VectorQuantizer

LEVEL_NAMES = {n: level_names(n) for n in range(1, MAX_LEVELS + 1)}  # {1: ("top",), 2: ("top", "bottom"), ...}


class VQVAEInputError(InputError):
    """Images or codes that do not fit the VQ-VAE (a one-line message)."""


@dataclass(frozen=True)
class VQVAEConfig:
    """VQ-VAE architecture. The bottom (or only) level sits at ``bottom_stride``; each level above it sits
    ``top_stride`` times coarser than the one below (2 levels: the top at ``bottom_stride * top_stride``; 3 levels:
    middle and top at 2 and 4 times the bottom's, as the VQ-VAE-2 paper's FFHQ-1024 model: 128x128, 64x64 and
    32x32 codes at ``bottom_stride`` 8, ``top_stride`` 2). Every level uses ``codebook_size`` codes (stored as
    uint16, so <= 65536)."""

    channels: int = 3  # image channels, 1 or 3
    levels: int = 1  # 1; 2 for the VQ-VAE-2 top/bottom hierarchy; 3+ adds middle levels
    codebook_size: int = 512
    embed_dim: int = 64  # code vector width
    hidden: int = 128  # encoder/decoder channels
    res_blocks: int = 2
    res_channels: int = 32
    bottom_stride: int = 4  # image pixels per bottom code, per side (a power of 2)
    top_stride: int = 2  # codes of a level per code of the level above, per side (a power of 2; 2+ levels only)
    decay: float = 0.99  # EMA decay of the codebook statistics
    commitment: float = 0.25  # weight of the commitment loss
    dead_code_threshold: float = 1.0  # restart codes whose EMA assignment count falls below this (0 disables)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ConfigError(f"VQ-VAE channels must be 1 or 3, got {self.channels}")
        if self.levels not in range(1, MAX_LEVELS + 1):
            raise ConfigError(f"levels must be an integer in [1, {MAX_LEVELS}], got {self.levels}")
        if not 2 <= self.codebook_size <= 65536:
            raise ConfigError(f"codebook-size must be in [2, 65536] (codes are stored as uint16), "
                              f"got {self.codebook_size}")
        for name in ("embed_dim", "hidden", "res_channels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.hidden < 2:
            raise ConfigError(f"hidden must be at least 2, got {self.hidden}")
        if self.res_blocks < 0:
            raise ConfigError(f"res-blocks must be >= 0, got {self.res_blocks}")
        for name in ("bottom_stride", "top_stride"):
            value = int(getattr(self, name))
            if value < 2 or value & (value - 1):
                raise ConfigError(f"{name.replace('_', '-')} must be a power of 2 >= 2, got {value}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"decay must be in [0, 1), got {self.decay}")
        if self.commitment < 0 or self.dead_code_threshold < 0:
            raise ConfigError("commitment and dead-code-threshold must be >= 0")

    @property
    def total_stride(self) -> int:
        """Image pixels per code of the coarsest level, per side."""
        return self.bottom_stride * self.top_stride ** (self.levels - 1)

    def level_strides(self) -> list[int]:
        """Image pixels per code, per side, of each level, coarsest first."""
        return [self.bottom_stride * self.top_stride ** (self.levels - 1 - i) for i in range(self.levels)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQVAEConfig":
        return _strict_from_dict(cls, data)


def vqvae_config_from_preset(name: str, **overrides: Any) -> VQVAEConfig:
    """A VQVAEConfig from a named preset; ``None`` overrides are ignored (unset CLI options)."""
    if name not in VQVAE_PRESETS:
        raise ConfigError(f"unknown VQ-VAE preset {name!r}; choose from {', '.join(VQVAE_PRESETS)}")
    values = dict(VQVAE_PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - {f.name for f in fields(VQVAEConfig)})
    if unknown:
        raise ConfigError(f"unknown VQ-VAE option(s): {', '.join(unknown)}")
    return VQVAEConfig(**values)


class ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(res_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def make_encoder(in_ch: int, hidden: int, res_blocks: int, res_channels: int, stride: int) -> nn.Sequential:
    """log2(stride) 4x4 stride-2 convs, a 3x3 conv, residual blocks: (B, in, H, W) -> (B, hidden, H/s, W/s)."""
    layers, ch = [], in_ch
    for i in range(int(math.log2(stride))):
        out = hidden // 2 if i == 0 else hidden
        layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
        ch = out
    layers.append(nn.Conv2d(ch, hidden, 3, padding=1))
    layers += [ResBlock(hidden, res_channels) for _ in range(res_blocks)]
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_decoder(in_ch: int, out_ch: int, hidden: int, res_blocks: int, res_channels: int,
                 stride: int) -> nn.Sequential:
    """A 3x3 conv, residual blocks, log2(stride) 4x4 stride-2 transposed convs: (B, in, h, w) -> (B, out, hs, ws)."""
    layers = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
    layers += [ResBlock(hidden, res_channels) for _ in range(res_blocks)]
    layers.append(nn.ReLU())
    ch, ups = hidden, int(math.log2(stride))
    for i in range(ups):
        last = i == ups - 1
        out = out_ch if last else hidden // 2
        layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        ch = out
    return nn.Sequential(*layers)


def make_upsampler(channels: int, stride: int) -> nn.Sequential:
    """Top code vectors to the bottom grid: log2(stride) 4x4 stride-2 transposed convs."""
    layers = []
    for i in range(int(math.log2(stride))):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    """One-level VQ-VAE, or the VQ-VAE-2 hierarchy. Encoding is bottom-up then top-down: the encoder stacks run from
    the image up to the top level's grid; the top codes are chosen first, and each level below joins its encoder
    features with the level above's code vectors decoded to its grid before its codes are chosen. The decoder sees
    every level, each upsampled to the bottom grid.

    Module names: ``encoder`` (image -> bottom grid), ``pre_quant`` (the bottom level's), ``decoder``; the top level
    of a hierarchy ``encoder_top``, ``pre_quant_top``, ``decoder_top`` (its vectors to the next level's grid),
    ``upsample_top`` (to the bottom grid); the middle levels of 3+ the same in ``encoder_middle`` etc., lists ordered
    coarsest first. Levels <= 2 build exactly the modules (and parameter order) of the first two-level version, so
    their checkpoints and optimizer states load unchanged."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = c = config
        block = dict(res_blocks=c.res_blocks, res_channels=c.res_channels)
        self.encoder = make_encoder(c.channels, c.hidden, stride=c.bottom_stride, **block)
        if c.levels >= 2:
            self.encoder_top = make_encoder(c.hidden, c.hidden, stride=c.top_stride, **block)
            self.pre_quant_top = nn.Conv2d(c.hidden, c.embed_dim, 1)
            self.decoder_top = make_decoder(c.embed_dim, c.embed_dim, c.hidden, stride=c.top_stride, **block)
            self.upsample_top = make_upsampler(c.embed_dim, c.top_stride ** (c.levels - 1))
        if c.levels >= 3:  # middle levels: features from the level below, codes conditioned on the level above
            middles = range(c.levels - 2)  # coarsest first; middle i sits top_stride ** (levels - 2 - i) above bottom
            self.encoder_middle = nn.ModuleList(make_encoder(c.hidden, c.hidden, stride=c.top_stride, **block)
                                                for _ in middles)
            self.pre_quant_middle = nn.ModuleList(nn.Conv2d(c.hidden + c.embed_dim, c.embed_dim, 1) for _ in middles)
            self.decoder_middle = nn.ModuleList(make_decoder(c.embed_dim, c.embed_dim, c.hidden, stride=c.top_stride,
                                                             **block) for _ in middles)
            self.upsample_middle = nn.ModuleList(make_upsampler(c.embed_dim, c.top_stride ** (c.levels - 2 - i))
                                                 for i in middles)
        self.pre_quant = nn.Conv2d(c.hidden + (c.embed_dim if c.levels >= 2 else 0), c.embed_dim, 1)
        self.quantizers = nn.ModuleList(  # ordered like the codes: [top, ..., bottom]
            VectorQuantizer(c.codebook_size, c.embed_dim, c.decay, c.commitment, c.dead_code_threshold)
            for _ in range(c.levels))
        self.decoder = make_decoder(c.embed_dim * c.levels, c.channels, c.hidden, stride=c.bottom_stride, **block)

    @property
    def level_names(self) -> tuple[str, ...]:
        """("top",) for one level, ("top", "bottom") for two, ("top", "middle", "bottom") for three, ...: the order
        of ``encode``'s output (``vqprior.levels``)."""
        return LEVEL_NAMES[self.config.levels]

    def code_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Code map shapes [(h, w) per level], coarsest first, for ``height`` x ``width`` images."""
        s = self.config.total_stride
        if height % s or width % s or height < s or width < s:
            raise VQVAEInputError(f"image size {height}x{width} is not a multiple of the VQ-VAE's total stride {s}; "
                                  f"resize the images (e.g. --image-size {max(s, -(-max(height, width) // s) * s)})")
        return [(height // stride, width // stride) for stride in self.config.level_strides()]

    # ---- internals ------------------------------------------------------------------------------------------------
    def _to_unit(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.channels:
            raise VQVAEInputError(f"expected images of shape (B, {c.channels}, H, W), got {tuple(images.shape)}")
        self.code_shapes(images.shape[2], images.shape[3])
        weight = self.pre_quant.weight
        images = images.to(weight.device)
        return uint8_to_unit(images, weight.dtype) if images.dtype == torch.uint8 else images.to(weight.dtype)

    def _level_modules(self, i: int) -> dict[str, nn.Module]:
        """Level i's (0 = top) encoder (from the level below's features), pre-quantization conv, decoder to the
        level below's grid and upsampler to the bottom grid; the bottom level has only ``pre_quant``."""
        last = self.config.levels - 1
        if i == last:
            return {"pre_quant": self.pre_quant}
        if i == 0:
            return {"encoder": self.encoder_top, "pre_quant": self.pre_quant_top, "decoder": self.decoder_top,
                    "upsample": self.upsample_top}
        return {"encoder": self.encoder_middle[i - 1], "pre_quant": self.pre_quant_middle[i - 1],
                "decoder": self.decoder_middle[i - 1], "upsample": self.upsample_middle[i - 1]}

    def _quantize(self, x: torch.Tensor, init_codebooks: bool = False) -> list[dict[str, torch.Tensor]]:
        """Encoder and quantizers for [-1, 1] images; with ``init_codebooks`` each codebook is first set from its
        level's encoder outputs (the top one first, since each level's encoder input depends on the codes above)."""
        levels = self.config.levels
        features = [self.encoder(x)]  # bottom-up: bottom grid first
        for i in range(levels - 2, -1, -1):
            features.append(self._level_modules(i)["encoder"](features[-1]))
        features.reverse()  # coarsest first, like the codes
        outs = []
        for i in range(levels):  # top-down: each level sees the code vectors of the level above
            h = features[i]
            if i:
                h = torch.cat([h, self._level_modules(i - 1)["decoder"](outs[-1]["quantized"])], 1)
            z = self._level_modules(i)["pre_quant"](h)
            if init_codebooks:
                self.quantizers[i].init_codebook(z)
            outs.append(self.quantizers[i](z))
        return outs

    def _decode_vectors(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Code vectors per level (coarsest first) -> reconstruction in [-1, 1] model range (unclamped)."""
        upsampled = [self._level_modules(i)["upsample"](v) for i, v in enumerate(vectors[:-1])]
        return self.decoder(torch.cat([*upsampled, vectors[-1]], 1) if upsampled else vectors[-1])

    # ---- public -----------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """Reconstruct a batch (uint8, or float already in [-1, 1]). Returns ``recon`` (model range), ``target``,
        ``loss`` = ``recon_loss`` (MSE in model range) + ``commitment``, ``codes`` (coarsest first) and ``stats`` for
        ``update_codebooks``. Never changes the codebooks."""
        x = self._to_unit(images)
        outs = self._quantize(x)
        recon = self._decode_vectors([o["quantized"] for o in outs])
        recon_loss = F.mse_loss(recon.float(), x.float())
        commitment = sum(o["commitment"] for o in outs)
        return {"recon": recon, "target": x, "loss": recon_loss + commitment, "recon_loss": recon_loss,
                "commitment": commitment, "codes": [o["codes"] for o in outs],
                "stats": [(o["inputs"], o["codes"]) for o in outs]}

    @torch.no_grad()
    def update_codebooks(self, outputs: dict[str, Any]) -> list[torch.Tensor]:
        """Apply the EMA codebook update for the batch ``forward`` returned ``outputs`` for; returns the number of
        restarted dead codes per level (0-d tensors: reading one is a host sync)."""
        return [q.update_codebook(inputs, codes) for q, (inputs, codes) in zip(self.quantizers, outputs["stats"])]

    @torch.no_grad()
    def init_codebooks(self, images: torch.Tensor) -> None:
        """Set every codebook from one batch's encoder outputs (once, before training)."""
        self._quantize(self._to_unit(images), init_codebooks=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 images (B, C, H, W) -> int64 codes [(B, h, w) per level], coarsest first ([top, bottom])."""
        return [o["codes"] for o in self._quantize(self._to_unit(images))]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> uint8 reconstructions through the codes."""
        outs = self._quantize(self._to_unit(images))
        return unit_to_uint8(self._decode_vectors([o["quantized"] for o in outs]).float())

    def check_codes(self, codes: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """Raise VQVAEInputError (one line) unless ``codes`` fit this VQ-VAE: one int map per level, in range,
        each map ``top_stride`` times coarser than the one below it."""
        c = self.config
        if isinstance(codes, torch.Tensor) or len(codes) != c.levels:
            raise VQVAEInputError(f"this VQ-VAE has {c.levels} level(s): pass a list of {c.levels} code map(s) "
                                  f"ordered [{', '.join(self.level_names)}]")
        for name, level in zip(self.level_names, codes):
            if not isinstance(level, torch.Tensor) or level.dim() != 3 or level.dtype.is_floating_point:
                shape = tuple(level.shape) if isinstance(level, torch.Tensor) else type(level).__name__
                raise VQVAEInputError(f"{name} codes must be an integer tensor (B, h, w), got {shape}")
            if level.numel() and (int(level.min()) < 0 or int(level.max()) >= c.codebook_size):
                raise VQVAEInputError(f"{name} codes outside the codebook: values must be in "
                                      f"[0, {c.codebook_size - 1}], got [{int(level.min())}, {int(level.max())}]")
        for i in range(1, c.levels):
            above, below = codes[i - 1], codes[i]
            expected = (above.shape[0], above.shape[1] * c.top_stride, above.shape[2] * c.top_stride)
            if tuple(below.shape) != expected:
                raise VQVAEInputError(f"{self.level_names[i]} codes must have shape {expected} for "
                                      f"{self.level_names[i - 1]} codes of shape {tuple(above.shape)}, "
                                      f"got {tuple(below.shape)}")

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """int codes [(B, h, w) per level], coarsest first ([top, bottom]) -> uint8 images (B, C, H, W)."""
        self.check_codes(codes)
        device = self.pre_quant.weight.device
        vectors = [q.lookup(level.to(device).long()) for q, level in zip(self.quantizers, codes)]
        return unit_to_uint8(self._decode_vectors(vectors).float())
