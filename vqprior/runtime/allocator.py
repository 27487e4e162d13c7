"""Host memory allocation: keep freed memory for the next step instead of faulting it in again, or (for training
with activation checkpointing) give it back at once.

Why: a training step on the CPU allocates and frees the same large activation tensors every step. glibc's malloc
serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised dynamically) with fresh ``mmap`` and gives the
top of the heap back above ``M_TRIM_THRESHOLD``; either way the next step touches new pages and the kernel zero-fills
them one page fault at a time: a profile of a training step (``torch.profiler``) puts a large share of it in those
faults, spread over whichever op touches the memory first.

``retain_freed_memory()`` sets, through ``mallopt``, a fixed mmap threshold at glibc's maximum (32 MiB on 64-bit:
smaller blocks come from the heap and are reused) and a trim threshold and top pad large enough that freed heap
memory stays mapped. The process then keeps its peak heap (it does not return freed memory to the system until it
exits), which is the right trade for a training or sampling process and is why the CLI's entry point calls it (a
command is a process that runs one job) and the library never does. Where the C library is not glibc (musl, macOS,
Windows) it does nothing. A user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
environment settings, or a preloaded allocator (tcmalloc, jemalloc), take precedence: then nothing is changed.

``return_freed_memory()`` is the opposite trade, for training with ``--checkpoint-activations`` (memory before
speed): a fixed mmap threshold of 1 MiB, so every activation-sized block is mapped when allocated and unmapped when
freed, and glibc's default trim threshold and top pad. The process's resident memory then follows its live
tensors. Kept in the heap instead, blocks freed in the middle of it stay resident (glibc can only give back the top),
and a checkpointed large prior's peak grows by hundreds of MB per image of the batch. The price is the page faults
``retain_freed_memory`` avoids, small next to a step of a model that needs the option. Calling one after the other
switches (the train commands do, after the CLI's ``retain_freed_memory``); blocks already in the heap stay there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 4 * 1024 ** 3  # keep up to 4 GiB of freed memory at the top of the heap
TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps: fewer brk calls, memory touched once
LEAN_MMAP_THRESHOLD = 1024 * 1024  # return_freed_memory: blocks from 1 MiB up are mapped and unmapped one by one
GLIBC_TRIM_THRESHOLD = GLIBC_TOP_PAD = 128 * 1024  # glibc's defaults
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_state: dict[str, object] = {}


def _reason_to_skip() -> str | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    if any(name in os.environ for name in USER_SETTINGS):
        return "MALLOC_* settings in the environment take precedence"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload or "jemalloc" in preload:
        return "a preloaded allocator takes precedence"
    return None


def retain_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory (the module docstring); idempotent. Returns whether applied."""
    return _apply("retain", ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                             (M_TOP_PAD, TOP_PAD)))


def return_freed_memory() -> bool:
    """Configure glibc malloc to give freed activation-sized blocks back at once (the module docstring);
    idempotent. Returns whether applied."""
    return _apply("return", ((M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD), (M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD),
                             (M_TOP_PAD, GLIBC_TOP_PAD)))


def configure_for_training(checkpoint_activations: bool) -> bool:
    """What ``train`` sets: freed memory kept for the next step, or given back at once with activation
    checkpointing (memory before speed). Returns whether the settings are applied."""
    return return_freed_memory() if checkpoint_activations else retain_freed_memory()


def _apply(mode: str, settings) -> bool:
    if _state.get("mode") == mode:
        return bool(_state["applied"])
    reason = _reason_to_skip()
    applied = False
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
            reason = None if applied else "mallopt refused a setting"
        except (OSError, AttributeError) as error:
            reason = f"mallopt unavailable ({error})"
    if reason:
        log.debug("malloc settings left as they are: %s", reason)
    _state.update(mode=mode, applied=applied)
    return applied
