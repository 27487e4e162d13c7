"""Autoregressive sampling from PixelSNAIL: the naive reference, the exact cached sampler, and completion.

``sample(model, num, method=...)`` draws images (pixel models) or code maps (priors) one raster position at a time.
``"naive"`` runs a full forward pass per position. ``"cached"`` (docs/design.md section 7) evaluates every layer at the
new position only: each conv layer keeps its (channels-last, zero-padded) input map filled up to the current
position and contracts the small causal window with its weight in one matmul; each attention step keeps the keys and
values of the positions sampled so far. Both call ``model.head.sample`` once per position on that position's (B, P)
parameters, so with the same generator they consume the same random numbers and give the same samples.

``CachedSampler`` (``vqprior.sampling.cached``, re-exported here) exposes the per-step API (``step`` -> parameters,
``append`` the sampled value).
"""
from __future__ import annotations

import torch

from vqprior.errors import InputError
from vqprior.sampling.cached import CachedSampler
from vqprior.sampling.guidance import Guidance, Unguided, check_guidance

METHODS = ("cached", "naive")


class SamplingError(InputError):
    """Bad arguments to a sampler (a user error with a one-line message)."""


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_codes(value, what: str, shape: tuple, high: int, device) -> torch.Tensor:
    """An integer tensor of exactly ``shape`` with values in [0, high), as int64 on ``device``."""
    value = torch.as_tensor(value, device=device)
    if tuple(value.shape) != shape:
        raise SamplingError(f"{what} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise SamplingError(f"{what} must be an integer tensor, got {value.dtype}")
    if value.numel() and (value.min() < 0 or value.max() >= high):
        raise SamplingError(f"{what} outside [0, {high - 1}]")
    return value.long()


def _check_inputs(model, num, shape, label, condition, prefix, start, device):
    """Validated (label, condition, prefix) for ``sample``: (num,) int64 or None, (num, h, w) int64 or None,
    output-shaped or None."""
    c = model.config
    if not c.num_classes and label is not None:
        raise SamplingError("this model is not class-conditional: do not pass a label")
    if c.num_classes:
        if label is None:
            raise SamplingError(f"this model is class-conditional: pass a label in [0, {c.num_classes - 1}]")
        label = torch.as_tensor(label, device=device)
        label = _check_codes(label.expand(num) if label.dim() == 0 else label, "label", (num,), c.num_classes,
                             device)
    if not c.cond_num_codes and condition is not None:
        raise SamplingError("this model is not conditioned on a code map: do not pass condition codes")
    if c.cond_num_codes:
        if condition is None:
            raise SamplingError("this is a bottom (or middle) prior: pass the top codes (the codes of the level "
                                "above) as condition")
        condition = _check_codes(condition, "condition (top) codes", (num, c.cond_height, c.cond_width),
                                 c.cond_num_codes, device)
    positions = shape[-2] * shape[-1]
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= positions:
        raise SamplingError(f"start must be an integer position in [0, {positions}], got {start!r}")
    if prefix is None and start:
        raise SamplingError("start > 0 needs a prefix holding the known positions")
    if prefix is not None and c.head == "pixels":
        prefix = torch.as_tensor(prefix, device=device)
        if tuple(prefix.shape) != shape or prefix.dtype != torch.uint8:
            raise SamplingError(f"an image prefix must be uint8 of shape {shape}, got {prefix.dtype} "
                                f"{tuple(prefix.shape)}")
    elif prefix is not None:
        prefix = _check_codes(prefix, "the prefix codes", shape, c.num_codes, device)
    return label, condition, prefix


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one (``cuda`` without an index is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return {a.index, b.index} <= {None, 0}


def check_generator(generator, device: torch.device) -> None:
    """Refuse, before any work, a generator on another device than the model's: the samplers draw their random
    numbers on the model's device, where torch would otherwise fail deep inside with a device-mismatch error."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise SamplingError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not _same_device(generator.device, torch.device(device)):
        raise SamplingError(f"the generator is on {generator.device} but the model is on {device}: create it with "
                            f"torch.Generator(device=...) on the model's device")


def _check_controls(model, num, method, temperature, top_k, top_p, batch_size, height, width) -> None:
    if not _positive_int(num):
        raise SamplingError(f"num must be a positive integer, got {num!r}")
    if method not in METHODS:
        raise SamplingError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not temperature > 0:
        raise SamplingError(f"temperature must be positive, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise SamplingError(f"top-k must be a non-negative integer (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top-p must be in (0, 1] (1 = off), got {top_p}")
    if model.config.head == "pixels" and (top_k or top_p < 1.0):
        raise SamplingError("top-k and top-p apply to code priors, not to pixel models")
    for name, value in (("batch size", batch_size), ("height", height), ("width", width)):
        if value is not None and not _positive_int(value):
            raise SamplingError(f"{name} must be a positive integer, got {value!r}")


def sample(model, num: int, method: str = "cached", generator: torch.Generator | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, label=None, condition=None, prefix=None,
           start: int = 0, batch_size: int | None = None, on_step=None, height: int | None = None,
           width: int | None = None, compile: bool | dict = False, guidance: float = 0.0) -> torch.Tensor:
    """Draw ``num`` samples: uint8 (num, C, H, W) images from a pixel model, int64 (num, H, W) codes from a prior.

    ``label``: int or (num,) tensor (class-conditional models); ``condition``: (num, h, w) top codes (bottom
    priors); ``prefix`` (same shape as the output) + ``start``: positions < start (raster order) are kept, the rest
    sampled. ``on_step(p, current_batch)`` runs after each sampled position. ``method="naive"`` runs a full forward
    pass per position (the reference); ``"cached"`` is the fast exact path; both give the same samples for the same
    generator. ``guidance`` W > 0 (models trained with a null class) draws from the classifier-free guided
    conditionals (``vqprior.sampling.guidance``); W = 0 is the unguided sampler. Runs in eval mode without gradients and
    returns on the model's device.

    ``compile`` (cached only): run the cached sampler with static shapes and ``torch.compile`` its step once for
    all positions (True: inductor, with CUDA graphs on CUDA; a dict: the ``torch.compile`` options to use, e.g.
    ``{"backend": "eager"}``). Its parameters equal the eager cached ones to float rounding (see docs/exactness.md).
    """
    _check_controls(model, num, method, temperature, top_k, top_p, batch_size, height, width)
    if compile and method != "cached":
        raise SamplingError("compile applies to the cached sampler (method='cached')")
    guidance = check_guidance(model, guidance)
    c = model.config
    H, W = height or c.height, width or c.width
    shape = (num, c.channels, H, W) if c.head == "pixels" else (num, H, W)
    device = next(model.parameters()).device
    check_generator(generator, device)
    label, condition, prefix = _check_inputs(model, num, shape, label, condition, prefix, start, device)
    out = torch.zeros(shape, dtype=torch.uint8 if c.head == "pixels" else torch.long, device=device)
    if prefix is not None:
        out.view(num, -1, H * W)[:, :, :start] = prefix.reshape(num, -1, H * W)[:, :, :start]
    controls = dict(generator=generator, temperature=temperature, top_k=top_k, top_p=top_p)
    compile_options = _compile_options(compile, device)
    draw = Guidance(model, controls, guidance) if guidance else Unguided(model, controls)
    step = batch_size or num
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, num, step):
                part = slice(b0, min(num, b0 + step))
                rows = draw.inputs(label[part] if label is not None else None,
                                   condition[part] if condition is not None else None)
                if method == "cached":
                    _sample_cached(model, out[part], start, *rows, draw, on_step, compile_options)
                else:
                    _sample_naive(model, out[part], start, *rows, draw, on_step)
    finally:
        model.train(was_training)
    return out


def _streams(x: torch.Tensor, draw) -> torch.Tensor:
    """``x`` repeated once per stream of ``draw`` along the batch (guidance runs 2B rows: y's, then the null's)."""
    return x if draw.streams == 1 else x.repeat(draw.streams, *([1] * (x.dim() - 1)))


def _sample_naive(model, canvas, start, label, condition, draw, on_step) -> None:
    W = canvas.shape[-1]
    for p in range(start, canvas.shape[-2] * W):
        r, c = divmod(p, W)
        params = model(_streams(canvas, draw), label=label, condition=condition)[:, :, r, c]  # (B or 2B, P)
        canvas[..., r, c] = draw(params)  # (B, C) pixels or (B,) codes
        if on_step is not None:
            on_step(p, canvas)


def _compile_options(compile, device: torch.device) -> dict | None:
    """None (eager), or the torch.compile options for the cached step: True = inductor after checking its
    toolchain, with CUDA graphs on CUDA (mode "reduce-overhead"); a dict is taken as given."""
    if isinstance(compile, dict):
        return dict(compile)
    if compile is not True and compile is not False:
        raise SamplingError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    if not compile:
        return None
    from vqprior.runtime.compiler import check_compiler

    check_compiler(device)
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def _sample_cached(model, canvas, start, label, condition, draw, on_step, compile_options=None) -> None:
    H, W = canvas.shape[-2:]
    if start == H * W:
        return  # nothing to sample: the prefix is the whole map
    sampler = CachedSampler(model, canvas.shape[0] * draw.streams, label, condition, H, W,
                            static=compile_options is not None)
    if compile_options is not None:
        sampler.compile(**compile_options)
    try:
        sampler.prefill(_streams(canvas, draw), start)
        for p in range(start, H * W):
            value = draw(sampler.step(p))
            sampler.append(p, _streams(value, draw))
            canvas[..., p // W, p % W] = value
            if on_step is not None:
                on_step(p, canvas)
    finally:
        sampler.close()  # a compiled sampler's buffers go now, not when the cycle collector runs


def complete(model, image_or_codes: torch.Tensor, keep_rows: int, num: int, **sample_kwargs) -> torch.Tensor:
    """Complete known inputs: keep their first ``keep_rows`` rows and sample the rest, ``num`` times each.

    ``image_or_codes``: one uint8 image (C, H, W) / code map (H, W), or a batch of n of them; the result holds
    n * num samples, the num completions of each input together. A label or condition tensor with n rows is
    repeated to match. Other keyword arguments go to ``sample``.
    """
    fixed = {"prefix", "start", "height", "width"} & set(sample_kwargs)
    if fixed:
        raise SamplingError(f"complete() sets {', '.join(sorted(fixed))} itself")
    x = torch.as_tensor(image_or_codes)
    item_dims = 3 if model.config.head == "pixels" else 2
    if x.dim() == item_dims:
        x = x.unsqueeze(0)
    if x.dim() != item_dims + 1:
        kind = "an image (C, H, W)" if item_dims == 3 else "a code map (H, W)"
        raise SamplingError(f"expected {kind} or a batch of them, got shape {tuple(x.shape)}")
    if not _positive_int(num):
        raise SamplingError(f"num must be a positive integer, got {num!r}")
    n, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    if not isinstance(keep_rows, int) or not 0 <= keep_rows <= H:
        raise SamplingError(f"keep_rows must be in [0, {H}], got {keep_rows!r}")
    for key in ("label", "condition"):
        value = sample_kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n and num > 1:
            sample_kwargs[key] = value.repeat_interleave(num, 0)
    return sample(model, n * num, prefix=x.repeat_interleave(num, 0), start=keep_rows * W, height=H, width=W,
                  **sample_kwargs)
