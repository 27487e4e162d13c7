"""Runtime: the process and device settings a run needs, each in one place: device checks, the precision policy
(TF32, autocast, GradScaler), deterministic mode, the compiler toolchain check and glibc's malloc settings.

Library code uses the context managers here so that a call leaves process-wide state as it found it; the CLI's
entry point applies the process-wide settings. May import only ``vqprior.config`` and ``vqprior.errors``.
"""
