"""Lossless compression with the model's exact conditionals (the issue-13 feature): see ``api`` for the entry
points, ``coding`` for the shared encoder/decoder loop, ``tables`` for the integer probabilities and
``container`` for the file format. Needs the optional extra ``vqprior[compress]`` (constriction)."""
from .api import DEFAULT_CHUNK, compress_codes, compress_images, decompress_codes, decompress_images
from .container import CompressedFileError, Header, unpack

__all__ = ["DEFAULT_CHUNK", "CompressedFileError", "Header", "compress_codes", "compress_images",
           "decompress_codes", "decompress_images", "unpack"]
