"""minicai: a minimal, readable reference implementation of Constitutional AI (Bai et al., 2022)."""


class MinicaiError(Exception):
    """A user error (bad file, missing weights, bad flag). The message names the file/line and the fix.

    Scripts print it as one line and exit non-zero; bugs still raise ordinary tracebacks."""
