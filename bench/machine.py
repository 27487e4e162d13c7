"""The machine a benchmark ran on, named the same way in every table: the CPU's model name with its family and model
numbers (a VM's "Intel(R) Xeon(R) Processor" names no generation; family 6 model 207 does), its cores and its bf16
hardware, all from /proc/cpuinfo (the platform module's guess elsewhere)."""
from __future__ import annotations

import os
import platform


def _cpuinfo_blocks() -> list[dict[str, str]]:
    """One dict per logical CPU of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return []
    blocks = [dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
              for block in text.split("\n\n") if block.strip()]
    return [{k.strip(): v.strip() for k, v in b.items()} for b in blocks]


def cpu_flags() -> set[str]:
    blocks = _cpuinfo_blocks()
    return set(blocks[0].get("flags", "").split()) if blocks else set()


def cpu_name() -> str:
    """E.g. "Intel(R) Xeon(R) Processor (family 6, model 207)"."""
    first = next(iter(_cpuinfo_blocks()), {})
    name = first.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in first and "model" in first:
        name += f" (family {first['cpu family']}, model {first['model']})"
    return name


def describe_cpu() -> str:
    """CPU name, physical cores (distinct (physical id, core id) pairs), logical CPUs and the bf16 hardware (AMX
    tiles, AVX512-BF16)."""
    cores = {(b.get("physical id"), b.get("core id")) for b in _cpuinfo_blocks() if "core id" in b}
    flags = cpu_flags()
    bf16 = ", ".join(name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in flags)
    return (f"{cpu_name()}, {len(cores) or '?'} physical cores, {os.cpu_count()} logical CPUs; "
            f"bf16 hardware: {bf16 or 'none'}")
