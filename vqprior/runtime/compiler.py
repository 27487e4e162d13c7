"""Whether ``torch.compile`` can build kernels on a device, checked before any compiling starts."""
from __future__ import annotations

import torch

from vqprior.errors import UserError


def check_compiler(device: torch.device) -> None:
    """Raise a one-line UserError when ``torch.compile`` cannot build kernels for ``device``.

    Inductor compiles C++ on CPU and Triton kernels on CUDA; without them the failure would otherwise surface as a
    long traceback in the middle of the first training step."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError("--compile on CUDA needs Triton (pip install triton); run without --compile")
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UserError("--compile needs a C++ compiler (g++ or clang++ on PATH, or CXX=...); "
                        "install one or run without --compile") from None
