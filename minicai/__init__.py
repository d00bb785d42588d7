"""minicai: a minimal, readable reference implementation of Constitutional AI (Bai et al., 2022)."""

import ctypes
import os
import sys


class MinicaiError(Exception):
    """A user error (bad file, missing weights, bad flag). The message names the file/line and the fix.

    Scripts print it as one line and exit non-zero; bugs still raise ordinary tracebacks."""


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every large block (logits, activations, gradients: megabytes each) with a fresh mmap and
    unmaps it on free, so a training step that frees and re-allocates the same gigabytes pays a page fault per 4 KiB
    every time (millions per PPO iteration; 5-10% of the update's time). With M_MMAP_MAX = 0 (no per-block mmap)
    and a 2 GiB M_TRIM_THRESHOLD, freed blocks stay in the heap and are reused. The price is a few freed blocks
    held in reserve: peak memory in bench/bench_ppo.py went from 5.8 to 6.0 GiB, and it levels off (no growth
    over iterations). Done once when minicai is imported, on Linux with glibc; set MINICAI_MALLOC=default to
    leave malloc alone. Returns whether the settings were applied."""
    if sys.platform != "linux" or os.environ.get("MINICAI_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


MALLOC_TUNED = keep_freed_memory()
