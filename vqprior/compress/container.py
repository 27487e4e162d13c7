"""The compressed file format (version 1): a small header, the range coder's words, and a CRC32 of it all.

Layout, little-endian::

    magic        4s   b"VQPZ"
    version      u8   FORMAT_VERSION
    kind         u8   1 = pixels (uint8 images), 2 = codes (VQ-VAE code maps, top first)
    count        u32  items (images or code maps) N
    chunk        u32  items coded together (the cached sampler's batch; the decoder must use the same)
    num_classes  u16  > 0: each item's class label is coded first in its chunk (uniformly over the classes)
    levels       u8   1 for pixels and 1-level priors, 2 for top + bottom
    per level:   32s  sha256 of the model (``model_sha256``: config and weights), then u16 x 3: pixels (C, H, W),
                      codes (h, w, 0)
    env          u8 length + ASCII: the torch version, device and CPU kernels that computed the probabilities, and
                      the constriction version that coded them
    names        u32 length + zlib-compressed JSON list of file names (length 0: none)
    data_sha256  16s  first 16 bytes of the sha256 of the decoded data (``data_digest``)
    payload      u32 length + bytes: constriction RangeEncoder words (uint32, little-endian)
    crc32        u32  of every byte before it

Reading checks, in order: the magic (a file that is not ours), the version, the CRC (corruption, truncation); the
caller then checks the kind and the model hashes before decoding and the data hash after.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError

MAGIC = b"VQPZ"
FORMAT_VERSION = 1
KINDS = {1: "pixels", 2: "codes"}
_FIXED = struct.Struct("<4sBBIIHB")
_LEVEL = struct.Struct("<32sHHH")


class CompressedFileError(UserError, ValueError):
    """A compressed file that cannot be decoded as asked (not ours, damaged, another model, ...)."""


@dataclass
class Header:
    kind: str
    count: int
    chunk: int
    num_classes: int
    shapes: list[tuple[int, int, int]]  # per level: (C, H, W) for pixels, (h, w, 0) for codes
    model_sha256: list[bytes]  # per level, 32 bytes each
    environment: str
    data_sha256: bytes
    names: list[str] | None = None
    payload: bytes = field(default=b"", repr=False)


def model_sha256(model) -> bytes:
    """sha256 of a model's architecture config and every tensor of its state (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.digest()


def data_digest(labels: torch.Tensor | None, arrays: list[torch.Tensor]) -> bytes:
    """First 16 bytes of the sha256 of the labels (int16) and the data (pixels uint8, codes uint16), C order."""
    digest = hashlib.sha256()
    if labels is not None:
        digest.update(np.ascontiguousarray(labels.cpu().numpy(), "<i2").tobytes())
    for a in arrays:
        a = a.cpu().numpy()
        digest.update(np.ascontiguousarray(a, np.uint8 if a.dtype == np.uint8 else "<u2").tobytes())
    return digest.digest()[:16]


def environment(device: torch.device) -> str:
    """What computed the probabilities: decoding elsewhere can give other floats (refused by the data hash)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        coder = version("constriction")
    except PackageNotFoundError:
        coder = "?"
    text = f"torch {torch.__version__} {device.type}"
    if device.type == "cpu":
        text += f" {torch.backends.cpu.get_cpu_capability()}"
    return f"{text} constriction {coder}"[:255]


def pack(h: Header) -> bytes:
    kind = {v: k for k, v in KINDS.items()}[h.kind]
    parts = [_FIXED.pack(MAGIC, FORMAT_VERSION, kind, h.count, h.chunk, h.num_classes, len(h.shapes))]
    parts += [_LEVEL.pack(sha, *shape) for sha, shape in zip(h.model_sha256, h.shapes)]
    env = h.environment.encode("ascii", "replace")[:255]
    names = zlib.compress(json.dumps(h.names).encode(), 9) if h.names is not None else b""
    parts += [bytes([len(env)]), env, struct.pack("<I", len(names)), names, h.data_sha256,
              struct.pack("<I", len(h.payload)), h.payload]
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise CompressedFileError("the file is truncated")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, s: struct.Struct):
        return s.unpack(self.take(s.size))


def unpack(data: bytes, where: str = "the file") -> Header:
    """Parse and check a compressed file's bytes; one-line CompressedFileErrors for anything not decodable."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise CompressedFileError(f"{where} is not a vqprior compressed file (no VQPZ magic)")
    if len(data) > len(MAGIC) and data[len(MAGIC)] > FORMAT_VERSION:
        raise CompressedFileError(f"{where} has format version {data[len(MAGIC)]}, newer than this vqprior "
                                  f"understands ({FORMAT_VERSION})")
    if len(data) < _FIXED.size + 4 or struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
        raise CompressedFileError(f"{where} is corrupt or truncated (CRC mismatch)")
    r = _Reader(data[:-4])
    try:
        _, _, kind, count, chunk, num_classes, levels = r.unpack(_FIXED)
        if kind not in KINDS or levels not in (1, 2) or chunk < 1:
            raise CompressedFileError(f"{where} has an invalid header")
        per_level = [r.unpack(_LEVEL) for _ in range(levels)]
        env = r.take(r.take(1)[0]).decode("ascii", "replace")
        names_raw = r.take(struct.unpack("<I", r.take(4))[0])
        names = json.loads(zlib.decompress(names_raw)) if names_raw else None
        digest = r.take(16)
        payload = r.take(struct.unpack("<I", r.take(4))[0])
    except (zlib.error, json.JSONDecodeError, UnicodeDecodeError):
        raise CompressedFileError(f"{where} has an invalid header") from None
    except CompressedFileError as e:
        raise CompressedFileError(f"{where}: {e}") from None
    if r.at != len(r.data):
        raise CompressedFileError(f"{where} has trailing bytes after the payload")
    return Header(KINDS[kind], count, chunk, num_classes, [tuple(lv[1:]) for lv in per_level],
                  [lv[0] for lv in per_level], env, digest, names, payload)
