"""minicai: a minimal, readable reference implementation of Constitutional AI (Bai et al., 2022).

Importing minicai (or any of its modules) changes nothing in the process; the CPU allocator setting that the
training scripts use lives in minicai/fast.py and is turned on by them (run.setup)."""


class MinicaiError(Exception):
    """A user error (bad file, missing weights, bad flag). The message names the file/line and the fix.

    Scripts print it as one line and exit non-zero; bugs still raise ordinary tracebacks."""
