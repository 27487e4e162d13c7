"""Lossless compression with a tractable-likelihood model: images with a pixel model, VQ-VAE code maps with priors.

``compress_images(model, images)`` -> (file bytes, stats); ``decompress_images(model, data)`` -> (images, names);
``compress_codes([top(, middle...)(, bottom)], codes)`` / ``decompress_codes(priors, data)`` likewise for code maps
(one prior per level, coarsest first, each conditioned on the level above).
A file takes about -log2 p(x) bits under the model (``stats["model_bits"]``) plus a fixed header of ~130 bytes.

Class-conditional models: the encoder gives each item the label under which the model codes it in the fewest bits
(a two-part code: the label costs log2(classes) bits, coded uniformly) and stores it in the stream.
"""
from __future__ import annotations

import math

import torch

from vqprior.compress import container
from vqprior.compress.coding import Decoder, Encoder, code_codes, code_labels, code_pixels, deterministic_coding
from vqprior.compress.container import CompressedFileError, Header
from vqprior.errors import InputError
from vqprior.levels import MAX_LEVELS, level_names

DEFAULT_CHUNK = 64


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_chunk(chunk) -> int:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise CompressedFileError(f"batch size must be a positive integer, got {chunk!r}")
    return chunk


@torch.no_grad()
def _log_probs(models, arrays, label=None, batch: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(N,) total log-likelihood in nats of the items under the chain of models (each prior below the top sees the
    level above),
    by full forward passes over ``batch`` items at a time."""
    n, out = arrays[0].shape[0], []
    for start in range(0, n, batch):
        part, total = slice(start, min(n, start + batch)), 0.0
        for i, (model, x) in enumerate(zip(models, arrays)):
            device = _device(model)
            cond = arrays[i - 1][part].to(device) if i else None
            lab = label[part].to(device) if model.config.num_classes else None
            log_prob = model.log_prob(x[part].to(device), condition=cond, label=lab)
            total = total + log_prob.double().flatten(1).sum(1).cpu()
        out.append(total)
    return torch.cat(out)


def _num_classes(models) -> int:
    classes = {m.config.num_classes for m in models if m.config.num_classes}
    if len(classes) > 1:
        raise CompressedFileError(f"the top and bottom priors have different numbers of classes: {sorted(classes)}"
                                  if len(models) == 2 else
                                  f"the priors have different numbers of classes: {sorted(classes)}")
    return classes.pop() if classes else 0


def _best_labels(models, arrays, num_classes: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per item, the label with the highest likelihood (None without classes), and that log-likelihood (nats)."""
    if not num_classes:
        return None, _log_probs(models, arrays)
    n = arrays[0].shape[0]
    scores = torch.stack([_log_probs(models, arrays, torch.full((n,), y, dtype=torch.long))
                          for y in range(num_classes)], 1)
    best = scores.max(1)
    return best.indices, best.values


def _stats(data: bytes, header_bytes: int, log_prob_nats: torch.Tensor, num_classes: int, values: int) -> dict:
    model_bits = float(-log_prob_nats.sum()) / math.log(2.0) + log_prob_nats.numel() * math.log2(num_classes or 1)
    return {"file_bytes": len(data), "header_bytes": header_bytes, "payload_bytes": len(data) - header_bytes,
            "model_bits": model_bits, "values": values, "bits_per_value": 8 * len(data) / values,
            "model_bits_per_value": model_bits / values}


def _encode(models, kind: str, arrays: list[torch.Tensor], chunk: int, names, code_chunk) -> tuple[bytes, dict]:
    """Shared by both kinds: labels, the range-coded chunks, the header; ``code_chunk(side, part, labels)``."""
    chunk = _check_chunk(chunk)
    n = arrays[0].shape[0]
    if n < 1:
        raise CompressedFileError("nothing to compress: no items")
    num_classes = _num_classes(models)
    labels, log_prob = _best_labels(models, arrays, num_classes)
    encoder = Encoder()
    with deterministic_coding(_device(models[0])):
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            lab = code_labels(encoder, num_classes, labels[part], part.stop - start) if num_classes else None
            code_chunk(encoder, [a[part] for a in arrays], lab)
    shapes = [tuple(a.shape[1:]) if kind == "pixels" else (*a.shape[1:], 0) for a in arrays]
    header = Header(kind, n, chunk, num_classes, shapes, [container.model_sha256(m) for m in models],
                    container.environment(_device(models[0])), container.data_digest(labels, arrays), names,
                    encoder.finish())
    data = container.pack(header)
    values = sum(a[0].numel() for a in arrays) * n
    return data, _stats(data, len(data) - len(header.payload), log_prob, num_classes, values)


def _decode(models, kind: str, data: bytes, where: str, decode_chunk) -> tuple[Header, list[torch.Tensor], object]:
    h = container.unpack(data, where)
    if h.kind != kind:
        other = "a pixel model" if h.kind == "pixels" else "code priors"
        raise CompressedFileError(f"{where} holds {h.kind}: decompress it with {other}")
    if len(h.model_sha256) != len(models):
        raise CompressedFileError(f"{where} was coded with {len(h.model_sha256)} prior(s), {len(models)} given "
                                  f"(a 2-level file needs the top prior and --bottom; 3+ levels --middle too)")
    for level, (model, sha) in enumerate(zip(models, h.model_sha256)):
        mine = container.model_sha256(model)
        if mine != sha:
            what = "the model" if kind == "pixels" else f"the {level_names(len(models))[level]} prior"
            raise CompressedFileError(f"{where} was compressed with another model: {what} has sha256 "
                                      f"{mine.hex()[:12]}..., the file needs {sha.hex()[:12]}...")
    for level, (model, shape) in enumerate(zip(models, h.shapes)):
        c = model.config
        if (kind == "pixels" and (shape[0] != c.channels or min(shape) < 1)) or \
                (kind == "codes" and tuple(shape[:2]) != (c.height, c.width)):
            raise CompressedFileError(f"{where} has an invalid header (level {level} shape {shape})")
    if h.num_classes != _num_classes(models):
        raise CompressedFileError(f"{where} codes {h.num_classes} classes but the model has {_num_classes(models)}")
    container.check_reproducible(h.environment, _device(models[0]), where)
    decoder = Decoder(h.payload)
    parts, labels = [[] for _ in models], []
    with deterministic_coding(_device(models[0])):
        for start in range(0, h.count, h.chunk):
            b = min(h.count, start + h.chunk) - start
            lab = code_labels(decoder, h.num_classes, None, b) if h.num_classes else None
            labels.append(lab)
            for i, x in enumerate(decode_chunk(decoder, b, h.shapes, lab)):
                parts[i].append(x)
    arrays = [torch.cat(p) for p in parts]
    labels = torch.cat(labels) if h.num_classes else None
    if container.data_digest(labels, arrays) != h.data_sha256:
        here = container.environment(_device(models[0]))
        cause = (f"it was encoded with {h.environment} and this is {here}; decode it with the same torch, device "
                 f"kernels and constriction" if here != h.environment else
                 "the probabilities computed here differ from the encoder's")
        raise CompressedFileError(f"{where}: the decoded data fail the checksum, nothing was written: {cause}")
    return h, arrays, labels


def compress_images(model, images: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                    names: list[str] | None = None) -> tuple[bytes, dict]:
    """uint8 (N, C, H, W) images -> the compressed file's bytes and stats (file/header bytes, bits per value,
    the model's -log2 p in bits). ``chunk`` images share one cached-sampler pass."""
    if model.config.head != "pixels":
        raise CompressedFileError("compress_images needs a pixel model; use compress_codes for code priors")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise CompressedFileError(f"images must be uint8 (N, C, H, W), got "
                                  f"{getattr(images, 'dtype', type(images).__name__)} "
                                  f"{tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] != model.config.channels:
        raise CompressedFileError(f"the model codes {model.config.channels}-channel images, got "
                                  f"{images.shape[1]} channel(s)")
    if names is not None and len(names) != images.shape[0]:
        raise InputError("one name per image")
    images = images.cpu()

    def code_chunk(side, arrays, label):
        code_pixels(model, side, tuple(arrays[0].shape), arrays[0], label)

    return _encode([model], "pixels", [images], chunk, names, code_chunk)


def decompress_images(model, data: bytes, where: str = "the file") -> tuple[torch.Tensor, list[str] | None]:
    """The inverse of ``compress_images``: (uint8 (N, C, H, W) images, their file names or None)."""
    if model.config.head != "pixels":
        raise CompressedFileError("decompress_images needs a pixel model")

    def decode_chunk(side, b, shapes, label):
        return [code_pixels(model, side, (b, *shapes[0]), None, label)]

    h, arrays, _ = _decode([model], "pixels", data, where, decode_chunk)
    return arrays[0], h.names


def _check_priors(priors) -> list:
    priors = list(priors)
    if not 1 <= len(priors) <= MAX_LEVELS or any(p.config.head != "codes" for p in priors):
        raise CompressedFileError("code maps are coded with one prior, or a top prior and a bottom prior (and "
                                  "the middle priors between them)")
    if len(priors) == 2 and not priors[1].config.cond_num_codes:
        raise CompressedFileError("the second prior must be a bottom prior (conditioned on the top codes)")
    for name, prior in zip(level_names(len(priors))[1:], priors[1:]):
        if not prior.config.cond_num_codes:
            raise CompressedFileError(f"the {name} prior must be conditioned on the codes of the level above")
    if priors[0].config.cond_num_codes:
        raise CompressedFileError("the first prior must be a top prior, not a bottom prior")
    return priors


def compress_codes(priors, codes: list[torch.Tensor], chunk: int = DEFAULT_CHUNK) -> tuple[bytes, dict]:
    """int code maps [top(, middle...)(, bottom)], each (N, h, w), with the priors [top, each lower level given the
    one above] -> (bytes, stats)."""
    priors = _check_priors(priors)
    if len(codes) != len(priors):
        raise CompressedFileError(f"{len(priors)} prior(s) need {len(priors)} code map level(s), got {len(codes)}")
    codes = [torch.as_tensor(c).cpu() for c in codes]
    for name, prior, c in zip(level_names(len(priors)), priors, codes):
        cfg = prior.config
        if c.dim() != 3 or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise CompressedFileError(f"{name} codes must be an integer array (N, h, w), got {c.dtype} "
                                      f"{tuple(c.shape)}")
        if tuple(c.shape[1:]) != (cfg.height, cfg.width):
            raise CompressedFileError(f"{name} codes must be {cfg.height}x{cfg.width} for this prior, got "
                                      f"{c.shape[1]}x{c.shape[2]}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= cfg.num_codes):
            raise CompressedFileError(f"{name} codes outside the codebook: values must be in "
                                      f"[0, {cfg.num_codes - 1}], got [{int(c.min())}, {int(c.max())}]")
    if len(codes) == 2 and codes[0].shape[0] != codes[1].shape[0]:
        raise CompressedFileError("top and bottom code maps differ in number")
    if len({c.shape[0] for c in codes}) > 1:
        raise CompressedFileError("the levels' code maps differ in number")
    codes = [c.long() for c in codes]

    def code_chunk(side, arrays, label):
        for i, prior in enumerate(priors):
            lab = label if prior.config.num_classes else None
            code_codes(prior, side, tuple(arrays[i].shape), arrays[i], lab, arrays[i - 1] if i else None)

    return _encode(priors, "codes", codes, chunk, None, code_chunk)


def decompress_codes(priors, data: bytes, where: str = "the file") -> list[torch.Tensor]:
    """The inverse of ``compress_codes``: the int64 code maps [top(, middle...)(, bottom)]."""
    priors = _check_priors(priors)

    def decode_chunk(side, b, shapes, label):
        out = []
        for i, prior in enumerate(priors):
            lab = label if prior.config.num_classes else None
            out.append(code_codes(prior, side, (b, *shapes[i][:2]), None, lab, out[i - 1] if i else None))
        return out

    return _decode(priors, "codes", data, where, decode_chunk)[1]
