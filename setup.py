"""Packaging: the library ``vqprior`` plus the CLI in ``commands/`` installed as ``vqprior.commands``."""
import re
from pathlib import Path

from setuptools import setup

version = re.search(r'__version__ = "([^"]+)"', Path("vqprior/__init__.py").read_text()).group(1)

setup(
    name="vqprior",
    version=version,
    description="PixelSNAIL autoregressive image priors: pixel-level density models and VQ-VAE code priors",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vqprior", "vqprior.data", "vqprior.compress", "vqprior.commands"],
    package_dir={"vqprior": "vqprior", "vqprior.commands": "commands"},
    package_data={"vqprior.data": ["sample/*.npz"]},
    install_requires=["torch>=2.1", "torchvision", "numpy", "click>=8", "pillow", "lmdb", "tqdm"],
    extras_require={"test": ["pytest"], "tensorboard": ["tensorboard"], "compress": ["constriction>=0.4"],
                    "plot": ["matplotlib"], "bench": ["imagecodecs"]},
    entry_points={"console_scripts": ["vqprior = vqprior.commands.cli:main"]},
)
