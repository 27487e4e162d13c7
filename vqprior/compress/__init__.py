"""Lossless compression with the model's exact conditionals: see ``api`` for the entry points, ``coding`` for the
shared encoder/decoder loop, ``tables`` for the integer probabilities and ``container`` for the file format. Needs
the optional extra ``vqprior[compress]`` (constriction).

May import models, sampling (the cached sampler), runtime and the top-level modules; nothing below imports it.
"""
from vqprior.compress.api import DEFAULT_CHUNK, compress_codes, compress_images, decompress_codes, decompress_images
from vqprior.compress.container import CompressedFileError, Header, unpack

__all__ = ["DEFAULT_CHUNK", "CompressedFileError", "Header", "compress_codes", "compress_images",
           "decompress_codes", "decompress_images", "unpack"]
