"""Per-image out-of-distribution scores from a model's exact likelihood (docs/ood.md).

Every score is "higher = more unusual" so that one evaluation (``vqprior.evaluation.ood``) reads them all:

- ``bits_per_dim``: -log2 p(x) / D under the model, the same float32 likelihood and float64 sums as ``evaluate``
  (the mean over a split is ``evaluate``'s figure). Raw likelihood: known to rank some OOD sets as *more* likely.
- ``likelihood_ratio``: bits/dim under the model minus bits/dim under a background model trained on perturbed
  inputs (``train-pixels --perturb``), i.e. -LLR / D of Ren et al. 2019: what the two share (low-level pixel
  statistics) cancels, what only the model learnt (the semantics) remains.
- ``complexity_<codec>``: bits/dim under the model minus bits/dim of a generic lossless codec's file for the same
  image (Serra et al. 2020): the codec measures how compressible the image is in itself.
- ``code_bits`` (two-stage priors): -log2 p(codes) of the image's codes at the prior's level, in bits per image of
  those codes (the image encoded by the prior's VQ-VAE; a lower-level prior conditioned on the codes above).
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch

from vqprior.errors import UserError

CODECS = ("png", "webp")


def _scored(model):
    """The density to score: a class-conditional model as the unconditional p(x) it defines (its null class when
    it has one, else the uniform mixture over its classes), since an input to be judged has no label."""
    from vqprior.evaluation.likelihood import ClassMarginal, NullClass

    if not model.config.num_classes:
        return model
    return NullClass(model) if model.config.null_class else ClassMarginal(model)


def _prior_inputs(prior, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes a prior models for uint8 ``images`` and its condition (the codes of the level above, if any)."""
    from vqprior.levels import level_above

    vq = prior.vqvae
    codes = dict(zip(vq.level_names, vq.encode(images)))
    level = prior.prior_info.get("level", "top")
    above = level_above(vq.level_names, level)
    return codes[level], (codes[above] if above is not None else None)


@torch.no_grad()
def model_bits(model, loader, device, progress: bool = False, desc: str = "score") -> tuple[np.ndarray, int]:
    """(-log2 p(x) per item in bits as float64, values per item) over a loader of ``{"image": uint8}`` batches: a
    pixel model scores the pixels, a prior (``model.vqvae`` set) the codes of its level."""
    from tqdm import tqdm

    scored, prior = _scored(model), getattr(model, "vqvae", None) is not None
    out, values = [], 0
    for batch in tqdm(loader, disable=not progress, desc=desc, unit="batch", dynamic_ncols=True):
        x = batch["image"].to(device)
        condition = None
        if prior:
            x, condition = _prior_inputs(model, x)
        log_prob = scored.log_prob(x, condition=condition, label=None).double()  # evaluate_nll's path
        out.append(-log_prob.flatten(1).sum(1).cpu() if log_prob.dim() > 1 else -log_prob.cpu())
        values = int(x[0].numel())
    if not out:
        raise UserError("nothing to score: no images")
    return torch.cat(out).numpy() / math.log(2.0), values


def check_codec(codec: str) -> None:
    """A one-line UserError unless this machine's Pillow can write ``codec`` losslessly."""
    from PIL import features

    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if codec == "webp" and not features.check("webp"):
        raise UserError("--codec webp: this machine's Pillow was built without WebP support (use --codec png)")


def codec_bits(images: torch.Tensor, codec: str) -> np.ndarray:
    """Bits of each uint8 (N, C, H, W) image's whole file under a lossless codec through Pillow: PNG at
    compress_level 9 with optimize, WebP lossless at quality 100, method 6 (the strongest settings)."""
    from PIL import Image

    check_codec(codec)
    out = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images.cpu().numpy()):
        im = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        buffer = io.BytesIO()
        if codec == "png":
            im.save(buffer, format="PNG", optimize=True, compress_level=9)
        else:
            im.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
        out[i] = 8.0 * buffer.tell()
    return out


def check_background(model, background) -> None:
    """A background model must be a pixel model of the same image shape and channel count as ``model``."""
    if getattr(background, "vqvae", None) is not None or background.config.head != "pixels":
        raise UserError("--background must be a pixel model (train-pixels --perturb)")
    have, want = background.config, model.config
    if (have.channels, have.height, have.width) != (want.channels, want.height, want.width):
        raise UserError(f"--background models {have.channels}x{have.height}x{have.width} images but the model "
                        f"{want.channels}x{want.height}x{want.width}")


def score_images(model, dataset, device, background=None, codec: str | None = None, batch_size: int = 64,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Per-image scores of ``dataset`` (uint8 ``{"image"}`` items) as named float64 columns (module docstring)."""
    from torch.utils.data import DataLoader

    prior = getattr(model, "vqvae", None) is not None
    if prior and (background is not None or codec):
        raise UserError("the likelihood ratio (--background) and input complexity (--codec) compare bits/dim of "
                        "pixels; a two-stage prior scores codes (score it alone)")
    if background is not None:
        check_background(model, background)
    if codec:
        check_codec(codec)
    loader = DataLoader(dataset, batch_size=batch_size)
    bits, values = model_bits(model, loader, device, progress)
    if prior:
        return {"code_bits": bits, "bits_per_code": bits / values}
    columns = {"bits_per_dim": bits / values}
    if background is not None:
        back, _ = model_bits(background, loader, device, progress, desc="background")
        columns["background_bits_per_dim"] = back / values
        columns["likelihood_ratio"] = columns["bits_per_dim"] - columns["background_bits_per_dim"]
    if codec:
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        columns[f"{codec}_bits_per_dim"] = codec_bits(images, codec) / values
        columns[f"complexity_{codec}"] = columns["bits_per_dim"] - columns[f"{codec}_bits_per_dim"]
    return columns
