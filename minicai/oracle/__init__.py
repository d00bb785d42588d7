"""minicai as a test oracle for other RLHF implementations.

conventions  named, cited profiles of how each framework computes PPO (`Convention`, `PROFILES`, `get`)
reference    the math of each stage, parameterised by a convention, in float64
golden       small JSON cases with the expected output under every profile (`python3 -m minicai.oracle generate`)
check        the dump format and its checker (`python3 -m minicai.oracle check DUMP --convention NAME`)

Importing this package has no side effect on the process (no allocator or thread settings).
"""

from minicai.oracle.conventions import AXIS_FIELDS, PROFILES, Convention, diff, get

__all__ = ["AXIS_FIELDS", "PROFILES", "Convention", "diff", "get"]
