"""The coding loops shared by encoder and decoder: one pass of the exact cached sampler per chunk of items.

Both directions run the very same function. At each raster position the ``CachedSampler`` gives the head
parameters, ``tables`` turns them into integer frequencies, and a ``Side`` codes the values: the encoder writes the
known values and returns them, the decoder reads them back. The values then go back into the sampler, so the
decoder's probabilities at every step are computed from exactly the inputs, in exactly the order and batch shape,
the encoder used. The entropy coder is constriction's range coder (a queue: first in, first out, so it decodes in
the order it encodes, position by position), fed with our integer frequencies exactly (see ``_as_constriction``).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from vqprior.compress.tables import categorical_table, pixel_table, uniform_table
from vqprior.errors import UserError
from vqprior.models.conditionals import PixelConditionals
from vqprior.runtime.determinism import deterministic
from vqprior.sampling.cached import CachedSampler


def _constriction():
    try:
        import constriction
    except ImportError:
        raise UserError("compression needs the optional extra: pip install 'vqprior[compress]'") from None
    return constriction


def _as_constriction(table: np.ndarray) -> np.ndarray:
    """Our frequencies q (>= 1, rows summing to 2**24) as the float weights for which constriction's lazy
    categorical model codes exactly q: it assigns symbol i the probability floor(F_i s) + i to floor(F_{i+1} s) +
    i + 1 with F the running sum of the weights and s = (2**24 - K) / sum; weights q - 1 (integers, exact in
    float64) make s = 1 and give every symbol exactly q_i (tested)."""
    return (table - 1).astype(np.float64)


class Encoder:
    """The writing side: ``code(table, values)`` appends ``values`` (n,) coded with ``table`` (n, K)."""

    def __init__(self):
        c = _constriction()
        self._coder = c.stream.queue.RangeEncoder()
        self._family = c.stream.model.Categorical(perfect=False)

    def code(self, table: np.ndarray, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        self._coder.encode(values.astype(np.int32), self._family, _as_constriction(table))
        return values

    def finish(self) -> bytes:
        return self._coder.get_compressed().astype("<u4").tobytes()


class Decoder:
    """The reading side: ``code(table)`` reads the next values (n,) coded with ``table`` (n, K)."""

    def __init__(self, payload: bytes):
        c = _constriction()
        self._coder = c.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        self._family = c.stream.model.Categorical(perfect=False)

    def code(self, table: np.ndarray, values=None) -> np.ndarray:
        try:
            out = self._coder.decode(self._family, _as_constriction(table))
        except Exception as e:  # noqa: BLE001 - constriction raises its own types for exhausted or invalid data
            # The CRC held, so this is not a damaged file: the probabilities computed here differ from the
            # encoder's in a way the recorded environment does not show (or the payload was altered, CRC refit).
            raise UserError(f"the compressed data do not decode with the probabilities computed here "
                            f"({str(e).splitlines()[0][:80]}); nothing was written") from None
        return np.asarray(out, dtype=np.int64)


@contextlib.contextmanager
def deterministic_coding(device: torch.device):
    """The coder's arithmetic must repeat exactly when decoding: deterministic mode (``vqprior.runtime.determinism``: on
    a GPU, deterministic cuDNN / cuBLAS / index kernels, no autotuning), and on the CPU one torch thread, since a
    matrix product's rounding may depend on how it is split between threads."""
    with deterministic():
        if device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def code_labels(side, num_classes: int, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
    """A chunk's class labels (B,), each coded with the uniform distribution over the classes."""
    known = labels.cpu().numpy() if labels is not None else None
    return torch.from_numpy(side.code(uniform_table(batch, num_classes), known))


@torch.no_grad()
def code_pixels(model, side, shape: tuple[int, int, int, int], images: torch.Tensor | None = None,
                label: torch.Tensor | None = None) -> torch.Tensor:
    """Code a chunk of uint8 images of ``shape`` (B, C, H, W) position by position, channels R, G | R, B | R, G;
    returns the (coded or decoded) images on the CPU. ``images`` is given when encoding."""
    B, C, H, W = shape
    device = next(model.parameters()).device
    out = torch.zeros(shape, dtype=torch.uint8)
    sampler = CachedSampler(model, B, label=None if label is None else label.to(device), height=H, width=W)
    for p in range(H * W):
        r, col = divmod(p, W)
        mixture = PixelConditionals(sampler.step(p), C, model.config.mixtures)
        for c in range(C):
            known = images[:, c, r, col] if images is not None else None
            value = torch.from_numpy(side.code(pixel_table(mixture, c), known)).to(torch.uint8)
            mixture.observe(c, value)
            out[:, c, r, col] = value
        sampler.append(p, out[:, :, r, col].to(device))
    return out


@torch.no_grad()
def code_codes(model, side, shape: tuple[int, int, int], codes: torch.Tensor | None = None,
               label: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Code a chunk of code maps of ``shape`` (B, h, w) with a prior (``condition``: the top codes for a bottom
    prior); returns the int64 codes on the CPU. ``codes`` is given when encoding."""
    B, h, w = shape
    device = next(model.parameters()).device
    out = torch.zeros(shape, dtype=torch.long)
    sampler = CachedSampler(model, B, label=None if label is None else label.to(device),
                            condition=None if condition is None else condition.to(device), height=h, width=w)
    for p in range(h * w):
        r, col = divmod(p, w)
        known = codes[:, r, col] if codes is not None else None
        out[:, r, col] = torch.from_numpy(side.code(categorical_table(sampler.step(p)), known))
        sampler.append(p, out[:, r, col].to(device))
    return out
