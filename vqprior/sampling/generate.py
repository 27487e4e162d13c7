"""From a checkpoint to pictures: sample pixels, or sample code maps (top, then each level below given the one
above) and decode them with the prior's embedded VQ-VAE; optionally record animation frames. Used by ``vqprior
sample``/``complete``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vqprior.errors import UserError
from vqprior.images import make_grid
from vqprior.levels import level_names
from vqprior.runtime.precision import autocast, precision_policy


@dataclass
class Generated:
    images: torch.Tensor  # uint8 (N, C, H, W)
    codes: list[torch.Tensor] = field(default_factory=list)  # int64 code maps, coarsest first, or [codes]
    frames: list[torch.Tensor] = field(default_factory=list)  # uint8 (3, H', W') grids for an animation


def prior_level(model) -> str:
    """'top' (or the single level), 'middle...' or 'bottom' (conditioned on the codes of the level above)."""
    return getattr(model, "prior_info", {}).get("level", "top")


def vqvae_levels(model) -> int:
    vq = getattr(model, "vqvae", None)
    return int(vq.config.levels) if vq is not None else 1


def _labels(model, num: int, label: int | None, device) -> torch.Tensor | None:
    classes = model.config.num_classes
    if label is None:
        return (torch.arange(num, device=device) % classes) if classes else None
    if not classes:
        raise UserError("--class given, but this model is not class-conditional")
    if not 0 <= label < classes:
        raise UserError(f"--class must be in [0, {classes - 1}], got {label}")
    return torch.full((num,), label, dtype=torch.long, device=device)


class _FrameRecorder:
    """Collects about ``max_frames`` grids while a map fills in, position by position."""

    def __init__(self, positions: int, render, max_frames: int = 60):
        self.stride = max(1, positions // max_frames)
        self.render, self.frames = render, []

    def __call__(self, p: int, current: torch.Tensor) -> None:
        if (p + 1) % self.stride == 0:
            self.frames.append(make_grid(self.render(current)))


def _on_step(*callbacks):
    """One ``on_step(p, current)`` calling each of ``callbacks`` that is not None (None when none is)."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None
    return lambda p, current: [c(p, current) for c in active]


def generate(model, num: int, *, precision: str = "fp32", progress: bool | None = False, **kwargs) -> Generated:
    """``_generate`` (below, all keyword options) under ``precision`` (see ``vqprior.runtime.precision``): "fp32",
    "tf32", or "bf16" = torch.autocast of every model call (the sampled values stay integers and the sampling arithmetic
    float32; the cached sampler's exactness holds only in fp32). ``progress``: a tqdm bar on stderr over the
    positions to sample (True), none (False), or one only when stderr is a terminal (None)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    with precision_policy(precision), autocast(device, precision), \
            tqdm(desc="sample", unit="pos", disable=None if progress is None else not progress,
                 dynamic_ncols=True, leave=False) as bar:
        result = _generate(model, num, bar=bar, **kwargs)
        bar.refresh()  # the final count, before the bar is cleared
        return result


def _generate(model, num: int, *, bottom=None, middle=(), method: str = "cached",
              generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              label: int | None = None, animate: bool = False, prefix: list[torch.Tensor] | torch.Tensor | None = None,
              start: int | list[int] = 0, batch_size: int | None = None, guidance: float = 0.0, bar=None,
              compile: bool | dict = False) -> Generated:
    """Sample ``num`` images from a pixel model or a (top) prior, with ``bottom`` the bottom prior of a 2+-level
    VQ-VAE and ``middle`` the priors of its middle levels (3+ levels; any order, matched by the level each records).
    Each level is sampled given the one above. ``prefix``/``start`` complete a known raster prefix: pixels, an image
    batch and a position; priors, a list of code maps (coarsest first) and a list of start positions, one per
    level. ``guidance`` (W, see ``vqprior.sampling.guidance``) guides the model sampled and every lower prior that has a
    null class too. ``bar`` (tqdm) counts the sampled positions. ``compile``: see ``vqprior.sampling.sampler.sample``
    (each prior's step is compiled once)."""
    from vqprior.sampling.sampler import sample

    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    chunks = -(-num // (batch_size or num))  # sample() draws the batches one after the other
    tick = (lambda p, current: bar.update(1)) if bar is not None else None

    def expect(*levels: int) -> None:  # (height, width, first position) of each level, before sampling
        if bar is not None:
            bar.total = chunks * sum(h * w - first for h, w, first in zip(levels[::3], levels[1::3], levels[2::3]))
            bar.refresh()

    device = next(model.parameters()).device
    labels = _labels(model, num, label, device)
    kwargs = dict(method=method, generator=generator, temperature=temperature, batch_size=batch_size,
                  compile=compile, guidance=guidance)
    if model.config.head == "pixels":
        if bottom is not None:
            raise UserError("--bottom applies to code priors, not to pixel models")
        if middle:
            raise UserError("--middle applies to code priors, not to pixel models")
        rec = _FrameRecorder(model.config.height * model.config.width, lambda x: x) if animate else None
        expect(model.config.height, model.config.width, start)
        images = sample(model, num, label=labels, on_step=_on_step(rec, tick), prefix=prefix, start=start, **kwargs)
        return Generated(images, [], rec.frames if rec else [])

    vq = getattr(model, "vqvae", None)
    if vq is None:
        raise UserError("this prior checkpoint carries no VQ-VAE to decode with")
    chain = prior_chain(model, bottom, middle)
    code_kw = dict(kwargs, top_k=top_k, top_p=top_p)
    prefixes = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix]
    prefixes += [None] * (len(chain) - len(prefixes))
    starts = list(start) if isinstance(start, (list, tuple)) else [start]
    starts = [starts[0]] + [starts[i] if prefixes[i] is not None else 0 for i in range(1, len(chain))]
    shapes = [(p.config.height, p.config.width) for p in chain]
    expect(*(v for (h, w), first in zip(shapes, starts) for v in (h, w, first)))
    codes: list[torch.Tensor] = []
    frames: list[torch.Tensor] = []
    for i, prior in enumerate(chain):
        rec = None
        if animate:  # frames: the levels sampled so far, this one filling in, zeros below
            below = [torch.zeros(num, h, w, dtype=torch.long, device=device) for h, w in shapes[i + 1:]]
            rec = _FrameRecorder(shapes[i][0] * shapes[i][1],
                                 lambda c, above=tuple(codes), below=below: vq.decode([*above, c, *below]))
        if i:  # a lower prior: given the class only when it has classes, guided only when it has a null class too
            level_labels = _labels(prior, num, label, device) if prior.config.num_classes else None
            code_kw["guidance"] = guidance if prior.config.null_class else 0.0  # see guided_levels
        else:
            level_labels = labels
        codes.append(sample(prior, num, label=level_labels, condition=codes[-1] if i else None,
                            on_step=_on_step(rec, tick), prefix=prefixes[i], start=starts[i], **code_kw))
        if rec:
            frames += rec.frames
    return Generated(vq.decode(codes), codes, frames)


def prior_chain(model, bottom=None, middle=()) -> list:
    """[top prior, middle priors coarsest first, bottom prior] after checking they form the hierarchy of the top
    prior's VQ-VAE: each level's prior present once, all trained on codes of the same VQ-VAE. One-line UserErrors
    naming the option to fix (--bottom, --middle)."""
    level = prior_level(model)
    if level == "bottom":
        raise UserError("this is a bottom prior: sample the top prior and pass this one with --bottom")
    if level != "top":
        raise UserError(f"this is a {level} prior: give the top prior as CKPT and this one with --middle")
    levels = vqvae_levels(model)
    names = level_names(levels)
    if levels >= 2 and bottom is None:
        raise UserError(f"this top prior belongs to a {levels}-level VQ-VAE: pass its bottom prior with --bottom")
    if levels == 1 and bottom is not None:
        raise UserError("--bottom given, but this prior's VQ-VAE has a single level")
    if middle and levels < 3:
        raise UserError(f"--middle given, but this prior's VQ-VAE has {levels} level(s) "
                        f"({', '.join(names)}): no middle level")
    if bottom is not None:
        if prior_level(bottom) != "bottom":
            raise UserError("the --bottom checkpoint is not a bottom prior")
        if getattr(bottom, "vqvae_sha256", "") != getattr(model, "vqvae_sha256", ""):
            raise UserError("the top and bottom priors were trained on codes of different VQ-VAEs")
    by_level = {}
    for prior in middle:
        name = prior_level(prior)
        if name not in names[1:-1]:
            raise UserError(f"a --middle checkpoint is a {name} prior, not one of this {levels}-level VQ-VAE's "
                            f"middle levels ({', '.join(names[1:-1])})")
        if name in by_level:
            raise UserError(f"--middle names two {name} priors")
        if getattr(prior, "vqvae_sha256", "") != getattr(model, "vqvae_sha256", ""):
            raise UserError(f"the top and {name} priors were trained on codes of different VQ-VAEs")
        by_level[name] = prior
    missing = [name for name in names[1:-1] if name not in by_level]
    if missing:
        raise UserError(f"this top prior belongs to a {levels}-level VQ-VAE: pass its {', '.join(missing)} "
                        f"prior(s) with --middle")
    return [model, *(by_level[name] for name in names[1:-1]), *([bottom] if bottom is not None else [])]


def guided_levels(bottom=None, middle=()) -> list[str]:
    """The models ``--guidance`` guides: the one sampled (it must have a null class), and each lower prior that has
    one too (a lower prior without one is sampled unguided, given the class as before)."""
    if bottom is None:
        return ["the model"]
    lower = [(prior_level(p), p) for p in middle] + [("bottom", bottom)]
    return ["the top prior"] + [f"the {name} prior" for name, p in lower if p.config.null_class]


@dataclass
class PriorPrefix:
    """What a code prior completes from: the re-encoded image's code maps, the first sampled position per level,
    and ``conditioned`` = uint8 (1, C, H, W), the kept code rows decoded (the rest grey): what the prior sees."""
    codes: list[torch.Tensor]
    starts: list[int]
    conditioned: torch.Tensor


@torch.no_grad()
def encode_prefix(vq, image: torch.Tensor, keep_rows: int, grey: int = 128) -> PriorPrefix:
    """Encode one uint8 (C, H, W) image with the prior's VQ-VAE and keep, per level, the code rows whose image rows
    all lie within the first ``keep_rows``. The conditioned view is the VQ-VAE's decoding of those codes, shown
    down to the image rows every level keeps (the coarsest level's kept rows), grey below: rows of the original
    the prior never sees (or sees only through the codes' lossy reconstruction) are not shown as if it did."""
    codes = vq.encode(image.unsqueeze(0))
    strides = vq.config.level_strides()
    starts = [(keep_rows // s) * code.shape[-1] for s, code in zip(strides, codes)]
    kept = min((keep_rows // s) * s for s in strides)
    conditioned = vq.decode(codes).clone()
    conditioned[:, :, kept:] = grey
    return PriorPrefix(codes, starts, conditioned)
