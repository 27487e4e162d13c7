"""Configuration: frozen dataclasses for the model, the optimiser loop and the VQ-VAE, plus named presets.

Configs travel inside checkpoints as plain dicts; ``from_dict`` is strict (unknown keys are rejected) so a
typo or a checkpoint from an incompatible version fails loudly instead of silently using a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from vqprior.errors import InputError

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # see vqprior.runtime.precision


class ConfigError(InputError):
    """A configuration value is invalid or unknown (always a user error with a one-line message)."""


def _strict_from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):  # JSON / torch.save round trip turns tuples into lists
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """PixelSNAIL architecture (docs/design.md section 3).

    ``head`` selects what the network models: ``"pixels"`` (discretized logistic mixture over ``channels`` image
    channels, 1 or 3) or ``"codes"`` (categorical over ``num_codes`` VQ-VAE code indices).
    """

    head: str = "pixels"
    channels: int = 3  # image channels for the pixel head (1 grayscale or 3 RGB)
    height: int = 32
    width: int = 32
    num_codes: int = 0  # codebook size for the codes head
    embed_dim: int = 32  # code embedding width (codes head input)
    filters: int = 256
    blocks: int = 12
    res_blocks: int = 4
    kernel_size: int = 2  # the down-right-shifted convolutions are kernel_size x kernel_size
    attention: bool = True
    attn_heads: int = 1
    key_channels: int = 16
    value_channels: int = 128
    dropout: float = 0.5
    mixtures: int = 10
    num_classes: int = 0  # > 0: class-conditional (a learned per-block bias)
    null_class: bool = False  # class-conditional with one more learned "no class" input, label num_classes (p(x))
    cond_num_codes: int = 0  # > 0: conditioned on a coarser code map with this codebook size
    cond_height: int = 0
    cond_width: int = 0
    cond_channels: int = 64
    cond_layers: int = 2

    def __post_init__(self):
        if self.head not in ("pixels", "codes"):
            raise ConfigError(f"head must be 'pixels' or 'codes', got {self.head!r}")
        if self.head == "pixels" and self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3 for the pixel head, got {self.channels}")
        if self.head == "codes" and self.num_codes < 2:
            raise ConfigError(f"num_codes must be at least 2 for the codes head, got {self.num_codes}")
        for name in ("height", "width", "filters", "blocks", "res_blocks", "kernel_size", "attn_heads",
                     "key_channels", "value_channels", "mixtures", "embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.key_channels % self.attn_heads or self.value_channels % self.attn_heads:
            raise ConfigError("key_channels and value_channels must be divisible by attn_heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0 or self.cond_num_codes < 0:
            raise ConfigError("num_classes and cond_num_codes must be >= 0")
        if self.null_class and not self.num_classes:
            raise ConfigError("a null class needs a class-conditional model (num_classes > 0)")
        if self.cond_num_codes and (self.cond_height < 1 or self.cond_width < 1):
            raise ConfigError("a code-map condition needs cond_height and cond_width")

    @property
    def class_rows(self) -> int:
        """Rows of each class embedding: the classes, plus the null class (label ``num_classes``) when present."""
        return self.num_classes + int(self.null_class)

    @property
    def out_channels(self) -> int:
        """Number of distribution parameters per position produced by the head."""
        if self.head == "codes":
            return self.num_codes
        per_mix = 1 + 2 * self.channels + (3 if self.channels == 3 else 0)  # logit, means, log-scales, coupling
        return self.mixtures * per_mix

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _strict_from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop (docs/design.md section 3: Adam(0.95, 0.9995), lr decay per step, Polyak EMA)."""

    steps: int = 1000
    batch_size: int = 8  # images (or code maps) per micro-batch; a step sees batch_size * grad_accum
    grad_accum: int = 1  # micro-batches whose gradients are summed before each optimizer step
    lr: float = 1e-3
    lr_decay: float = 0.999998  # multiplied into the learning rate every step
    beta1: float = 0.95
    beta2: float = 0.9995
    ema: float = 0.9995
    grad_clip: float = 0.0  # 0 disables clipping
    eval_every: int = 500
    sample_every: int = 1000
    checkpoint_every: int = 200
    eval_limit: int = 0  # 0 = the whole held-out split
    num_samples: int = 16
    seed: int = 0
    precision: str = "fp32"
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    # Speed/memory switches (vqprior.training.acceleration); they do not change the objective and may change on resume.
    compile: bool = False  # torch.compile the training model
    checkpoint_activations: bool = False  # recompute each gated block / attention step in the backward pass
    time_limit: float = 0.0  # minutes of step time (train_seconds, resumes included) after which the run ends; 0 = off
    cooldown_steps: int = 0  # the last N steps before `steps` take the learning rate linearly down to 0; 0 = off

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "sample_every", "checkpoint_every",
                     "num_samples", "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not self.time_limit >= 0:
            raise ConfigError(f"time-limit must be >= 0 minutes, got {self.time_limit}")
        if not 0 <= int(self.cooldown_steps) <= int(self.steps):
            raise ConfigError(f"cooldown-steps must be between 0 and steps ({self.steps}), got {self.cooldown_steps}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be fp32, tf32, bf16 or fp16, got {self.precision!r}")

    @property
    def effective_batch(self) -> int:
        """Images (or code maps) per optimizer step: ``batch_size`` times ``grad_accum``."""
        return self.batch_size * self.grad_accum

    def learning_rate(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): ``lr * lr_decay**step``, and over the last ``cooldown_steps``
        steps before ``steps`` also a linear factor down to 1/cooldown_steps at the last step (the "decay" of a
        warmup-stable-decay schedule, Hagele et al. 2024: a short anneal at the end of the budget). A function of the
        step alone, so a resumed run follows the uninterrupted run's schedule exactly."""
        lr = self.lr * self.lr_decay ** step
        if self.cooldown_steps:
            lr *= min(1.0, (self.steps - step) / self.cooldown_steps)
        return lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _strict_from_dict(cls, data)


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from (recorded in checkpoints so evaluation can find the same data)."""

    dataset: str = "sample"
    data_dir: str = ""
    image_size: int = 0  # 0 = the dataset's native size
    cache: str = ""
    download: bool = False
    class_conditional: bool = False
    limit: int = 0  # train on the first N training images only (0 = all); a resumed run keeps it
    cache_encoding: str = "raw"  # how the image cache stores images: raw, png (lossless) or jpeg (lossy)
    jpeg_quality: int = 90  # the JPEG quality of a jpeg image cache
    # Classifier-free guidance training (vqprior.sampling.guidance): each label is replaced by the null class with this
    # probability, so one network learns p(x | y) and p(x). A resumed run keeps it.
    class_dropout: float = 0.0
    # Background models for the likelihood ratio (docs/ood.md): this fraction of the sub-pixels of each training batch
    # is replaced by uniform random values 0..255 (Ren et al. 2019's mu). Held-out evaluation stays on clean data.
    perturb: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class-dropout must be in [0, 1), got {self.class_dropout}")
        if not 0.0 <= self.perturb < 1.0:
            raise ConfigError(f"perturb must be in [0, 1), got {self.perturb}")
        if self.class_dropout and not self.class_conditional:
            raise ConfigError("class-dropout needs a class-conditional model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        return _strict_from_dict(cls, data)


# Architecture presets. Image size, channels, head and conditioning come from the data, not the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: runs in milliseconds on 8x8 inputs.
    "tiny": dict(filters=16, blocks=2, res_blocks=1, key_channels=4, value_channels=8, dropout=0.0, mixtures=2,
                 embed_dim=8, cond_channels=8, cond_layers=1),
    # CPU-trainable in minutes on 32x32.
    "small": dict(filters=64, blocks=2, res_blocks=2, key_channels=16, value_channels=32, dropout=0.1, mixtures=5,
                  embed_dim=32, cond_channels=32, cond_layers=2),
    # The paper's CIFAR-10 model (about 46M parameters).
    "paper-cifar10": dict(filters=256, blocks=12, res_blocks=4, key_channels=16, value_channels=128, dropout=0.5,
                          mixtures=10),
    # The paper's ImageNet 32x32 model: 32 mixtures, no dropout.
    "paper-imagenet32": dict(filters=256, blocks=12, res_blocks=4, key_channels=16, value_channels=128, dropout=0.0,
                             mixtures=32),
    # VQ-VAE-2 at 256x256 (docs/vqvae2-256.md): the priors of rosinality's vq-vae-2-pytorch at its defaults, with
    # parameter counts matched (84.8M vs 84.9M top, 89.4M vs 89.8M bottom): 256 filters, 4 blocks of 4 gated blocks,
    # 5x5 kernels, 8 attention heads over 128 key/value channels, dropout 0.1; the bottom prior's condition stack is
    # 3 layers of 256 channels. Unlike the peer the bottom prior keeps attention: with down-right convolutions alone
    # a position never sees the codes above and to its right, and SDPA's fused kernel keeps 4,096-position attention
    # linear in memory. The code embedding is 256 wide where the peer feeds one-hot vectors (same role, fewer FLOPs).
    "vqvae2-top": dict(filters=256, blocks=4, res_blocks=4, kernel_size=5, attn_heads=8, key_channels=128,
                       value_channels=128, dropout=0.1, embed_dim=256),
    "vqvae2-bottom": dict(filters=256, blocks=4, res_blocks=4, kernel_size=5, attn_heads=8, key_channels=128,
                          value_channels=128, dropout=0.1, embed_dim=256, cond_channels=256, cond_layers=3),
    # Near the paper's ImageNet 256x256 priors (Razavi et al. 2019, appendix: 20 layers of 512 channels, 5x5
    # kernels, 8 heads, dropout 0.1, a 20-block condition stack): GPU-scale, 0.4-0.5 billion parameters.
    "vqvae2-top-paper": dict(filters=512, blocks=4, res_blocks=5, kernel_size=5, attn_heads=8, key_channels=256,
                             value_channels=256, dropout=0.1, embed_dim=256),
    "vqvae2-bottom-paper": dict(filters=512, blocks=4, res_blocks=5, kernel_size=5, attn_heads=8, key_channels=256,
                                value_channels=256, dropout=0.1, embed_dim=256, cond_channels=512, cond_layers=20),
}

# What `vqprior presets` counts each preset's parameters as (the data decide size, head and conditioning; these are
# the uses a preset is named for). Presets not listed: a 32x32 RGB pixel model.
PRESET_USES: dict[str, tuple[str, dict[str, Any]]] = {
    name: (f"{level} prior over {size}x{size} codes of 512" + (", conditioned on 32x32 top codes"
                                                               if level == "bottom" else ""),
           dict(head="codes", num_codes=512, height=size, width=size,
                **(dict(cond_num_codes=512, cond_height=32, cond_width=32) if level == "bottom" else {})))
    for name, level, size in (("vqvae2-top", "top", 32), ("vqvae2-bottom", "bottom", 64),
                              ("vqvae2-top-paper", "top", 32), ("vqvae2-bottom-paper", "bottom", 64))}
DEFAULT_PRESET_USE = ("pixel model of 32x32 RGB images", dict(head="pixels", channels=3, height=32, width=32))


# VQ-VAE architecture presets (vqprior.models.vqvae.VQVAEConfig fields; kept here so the CLI can list their names
# without importing torch). Channels come from the data; levels from the command line unless the preset sets them.
VQVAE_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: 8x8 or 16x16 inputs, milliseconds per step.
    "tiny": dict(codebook_size=16, embed_dim=8, hidden=16, res_blocks=1, res_channels=8, bottom_stride=2,
                 top_stride=2),
    # CPU-trainable on 32x32 in minutes: bottom codes 8x8 (stride 4), top codes 4x4 (stride 8).
    "small": dict(codebook_size=256, embed_dim=32, hidden=64, res_blocks=2, res_channels=32, bottom_stride=4,
                  top_stride=2),
    # The VQ-VAE-2 paper's layout and widths (bottom stride 4, top stride 8), for a GPU.
    "base": dict(codebook_size=512, embed_dim=64, hidden=128, res_blocks=2, res_channels=32, bottom_stride=4,
                 top_stride=2),
    # VQ-VAE-2 at 256x256 (docs/vqvae2-256.md): `base` with both levels, 64x64 bottom and 32x32 top codes; the same
    # widths as rosinality's vq-vae-2-pytorch (1,388,867 parameters in both).
    "vqvae2-256": dict(levels=2, codebook_size=512, embed_dim=64, hidden=128, res_blocks=2, res_channels=32,
                       bottom_stride=4, top_stride=2),
}


def model_config_from_preset(preset: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a named preset; ``None`` overrides are ignored (unset CLI options)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
    return ModelConfig(**values)


__all__ = ["PRECISIONS", "ConfigError", "ModelConfig", "TrainConfig", "DataConfig", "PRESETS", "PRESET_USES",
           "DEFAULT_PRESET_USE", "VQVAE_PRESETS", "model_config_from_preset"]
