"""The fast CPU path (minicai/fast.py) against the reference (minicai/model.py): the contract between them.

Importing minicai changes nothing in the process: the malloc setting is something a script turns on."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPY = textwrap.dedent("""
    import ctypes, json, sys
    import torch, numpy  # their own native libraries load before the spy
    opened = []
    class Spy(ctypes.CDLL):
        def __init__(self, name, *a, **k):
            opened.append(str(name))
            super().__init__(name, *a, **k)
    ctypes.CDLL = Spy
    import minicai, minicai.losses, minicai.model, minicai.sampling, minicai.fast  # noqa: E401
    before = list(opened)
    if sys.argv[1] == "call":
        minicai.fast.keep_freed_memory()
    print(json.dumps({"on_import": before, "after": opened}))
""")


def _spy(mode: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", SPY, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_leaves_malloc_alone():
    """`import minicai` (and its rooms) opens no C library: mallopt is not called. The control: calling
    fast.keep_freed_memory does open libc (so the spy would see an import-time call)."""
    assert _spy("import")["on_import"] == []
    if sys.platform == "linux":
        assert "libc.so.6" in _spy("call")["after"]
