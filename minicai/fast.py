"""The same model, faster on the CPU. Nothing here is needed to understand the method; model.py is the reference.

keep_freed_memory: a process-level malloc setting, turned on explicitly by the scripts (run.setup), never on import.
"""

from __future__ import annotations

import ctypes
import os
import sys


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every large block (logits, activations, gradients: megabytes each) with a fresh mmap and
    unmaps it on free, so a training step that frees and re-allocates the same gigabytes pays a page fault per 4 KiB
    every time. With M_MMAP_MAX = 0 (no per-block mmap) and a 2 GiB M_TRIM_THRESHOLD, freed blocks stay in the heap
    and are reused, at the price of a few freed blocks held in reserve (BENCHMARKS.md has the measured effect).
    This changes the whole process, so only scripts call it (run.setup on the CPU; bench/), never an import.
    Linux with glibc only; MINICAI_MALLOC=default leaves malloc alone. Returns whether the settings were applied."""
    if sys.platform != "linux" or os.environ.get("MINICAI_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
