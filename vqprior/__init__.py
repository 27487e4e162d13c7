"""vqprior: tractable-likelihood autoregressive image priors with a PixelSNAIL core.

The public API is small and imported lazily so that ``vqprior --help`` stays fast:
``load_model(path)`` and ``sample(model, num, ...)``.
"""
import os

__version__ = "0.1.0"

# cuBLAS takes its workspace setting once, at a process's first matrix product on a GPU, and deterministic mode
# (vqprior.runtime.determinism, which the lossless coder always enters) needs this one: set before any vqprior code
# can run GPU work. The same workspace size torch picks by default on recent GPUs; a user's own setting is kept.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def load_model(path, device="cpu"):
    """Load a checkpoint's model in eval mode with EMA weights (see ``vqprior.checkpoint.load_model``)."""
    from vqprior.checkpoint import load_model as _load
    return _load(path, device=device)


def sample(model, num, method="cached", generator=None, temperature=1.0, **kwargs):
    """Sample ``num`` images (pixel models) or code maps (priors); see ``vqprior.sampling.sampler.sample``."""
    from vqprior.sampling.sampler import sample as _sample
    return _sample(model, num, method=method, generator=generator, temperature=temperature, **kwargs)


__all__ = ["__version__", "load_model", "sample"]
