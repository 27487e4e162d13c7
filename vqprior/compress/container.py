"""The compressed file format (version 1): a small header, the range coder's words, and a CRC32 of it all.

Layout, little-endian::

    magic        4s   b"VQPZ"
    version      u8   FORMAT_VERSION
    kind         u8   1 = pixels (uint8 images), 2 = codes (VQ-VAE code maps, coarsest (top) first)
    count        u32  items (images or code maps) N
    chunk        u32  items coded together (the cached sampler's batch; the decoder must use the same)
    num_classes  u16  > 0: each item's class label is coded first in its chunk (uniformly over the classes)
    levels       u8   1 for pixels and 1-level priors, 2 for top + bottom, N for a hierarchy of N levels
    per level:   32s  sha256 of the model (``model_sha256``: config and weights), then u16 x 3: pixels (C, H, W),
                      codes (h, w, 0)
    env          u8 length + ASCII: what computed the probabilities (``environment``), "torch V cpu CAPABILITY
                      constriction V" or "torch V cuda gpu=MODEL cuda=V cudnn=V constriction V" (spaces in the
                      GPU's name written as _); CUDA files written before the GPU record hold "torch V cuda
                      constriction V"
    names        u32 length + zlib-compressed JSON list of file names (length 0: none)
    data_sha256  16s  first 16 bytes of the sha256 of the decoded data (``data_digest``)
    payload      u32 length + bytes: constriction RangeEncoder words (uint32, little-endian)
    crc32        u32  of every byte before it

Reading checks, in order: the magic (a file that is not ours), the version, the CRC (corruption, truncation); the
caller then checks the kind, the model hashes and the environment (``check_reproducible``: refused before decoding
where the probabilities cannot be recomputed exactly) and the data hash after.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from vqprior.errors import InputError
from vqprior.levels import MAX_LEVELS

MAGIC = b"VQPZ"
FORMAT_VERSION = 1
KINDS = {1: "pixels", 2: "codes"}
_FIXED = struct.Struct("<4sBBIIHB")
_LEVEL = struct.Struct("<32sHHH")


class CompressedFileError(InputError):
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


def device_identity(device: torch.device) -> dict:
    """What decides the floats a model computes on ``device``: torch's version and the device's kernels (the CPU's
    ATen capability; a GPU's model, with spaces as _, and its CUDA and cuDNN versions)."""
    ident = {"torch": torch.__version__, "device": device.type}
    if device.type == "cpu":
        ident["cpu"] = torch.backends.cpu.get_cpu_capability()
    elif device.type == "cuda":
        ident.update(gpu="_".join(torch.cuda.get_device_name(device).split()), cuda=torch.version.cuda or "?",
                     cudnn=str(torch.backends.cudnn.version()))
    return ident


def _constriction_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("constriction")
    except PackageNotFoundError:
        return "?"


def environment(device: torch.device) -> str:
    """The header's record of what computed the probabilities (at most 255 ASCII characters, space-separated)."""
    ident = device_identity(device)
    kernels = [ident["cpu"]] if "cpu" in ident else [f"{k}={v}" for k, v in ident.items() if k not in ("torch",
                                                                                                    "device")]
    words = ["torch", ident["torch"], ident["device"], *kernels, "constriction", _constriction_version()]
    return " ".join("_".join(str(w).split()) for w in words).encode("ascii", "replace").decode()[:255]


def parse_environment(text: str) -> dict | None:
    """The record as a dict, None when unreadable."""
    words = text.split()
    if len(words) < 3 or words[0] != "torch":
        return None
    record = {"torch": words[1], "device": words[2]}
    kernels = words[3:words.index("constriction")] if "constriction" in words else words[3:]
    if words[2] == "cpu":
        if kernels:
            record["cpu"] = kernels[0]
    else:
        record.update(w.split("=", 1) for w in kernels if "=" in w)
    return record


_KERNELS = {"cpu": ("torch", "cpu"), "cuda": ("torch", "gpu", "cuda", "cudnn")}
_NAMES = {"torch": "torch", "cpu": "CPU kernels", "gpu": "GPU", "cuda": "CUDA", "cudnn": "cuDNN"}


def describe_environment(record: dict) -> str:
    if record.get("device") == "cuda":
        gpu = str(record.get("gpu", "GPU unknown")).replace("_", " ")
        return f"CUDA ({gpu}, CUDA {record.get('cuda', '?')}, cuDNN {record.get('cudnn', '?')}, " \
               f"torch {record.get('torch', '?')})"
    if record.get("device") == "cpu":
        return f"the CPU ({record.get('cpu', '?')} kernels, torch {record.get('torch', '?')})"
    return f"{record.get('device', '?')} (torch {record.get('torch', '?')})"


def check_reproducible(recorded: str, device: torch.device, where: str = "the file") -> None:
    """Refuse, before decoding, a file whose probabilities this device cannot recompute exactly: another device
    kind, or the same kind with other kernels (torch version; the CPU's capability; the GPU model, CUDA or cuDNN)."""
    record, here = parse_environment(recorded), device_identity(device)
    if record is None:
        return
    differs = []
    if record["device"] != here["device"]:
        differs.append("device")
    else:
        differs = [_NAMES[k] for k in _KERNELS.get(here["device"], ("torch",)) if record.get(k) != here.get(k)]
    if not differs:
        return
    hint = ""
    if differs == ["CPU kernels"]:
        hint = f"; on a CPU with more, ATEN_CPU_CAPABILITY={str(record.get('cpu')).lower()} selects those kernels"
    raise CompressedFileError(f"{where} was compressed on {describe_environment(record)} and this is "
                              f"{describe_environment(here)}: other {', '.join(differs)} compute other "
                              f"probabilities, so it is not decoded; decompress it where it was made{hint}")


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
        if kind not in KINDS or not 1 <= levels <= MAX_LEVELS or chunk < 1:
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
