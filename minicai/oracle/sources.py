"""Loading a framework's own source files without its heavy imports (Ray, DeepSpeed, omegaconf, ...).

openrlhf_ppo.py and verl_ppo.py run a few of a published package's functions as they are: its directories become
bare namespace packages, the modules its files import but the functions used never call become empty stand-ins,
and the files are executed in order. `sys.modules` is left as it was afterwards. `write_ppo_dump` writes what they
computed, `main` is their command line.
"""

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

from minicai import MinicaiError
from minicai.oracle.check import write_dump
from minicai.oracle.tiny_models import EOS_ID, PAD_ID


def load_sources(root: Path, packages: tuple[str, ...], stubs: dict[str, dict[str, object]],
                 files: dict[str, str]) -> dict[str, types.ModuleType]:
    """Every module made, by name: `packages` (namespace packages over root's directories), `stubs` (name ->
    the only attributes it has; a name among `packages` gets the attributes added) and `files` (module name ->
    file under root, executed in this order)."""
    tops = {name.split(".")[0] for name in (*packages, *stubs, *files)}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in tops}
    made: dict[str, types.ModuleType] = {}
    try:
        for pkg in packages:
            made[pkg] = sys.modules[pkg] = types.ModuleType(pkg)
            made[pkg].__path__ = [str(root / pkg.replace(".", "/"))]
        for name, attrs in stubs.items():
            mod = made.get(name) or types.ModuleType(name)
            for key, value in attrs.items():
                setattr(mod, key, value)
            made[name] = sys.modules[name] = mod
        for name, rel in files.items():
            spec = importlib.util.spec_from_file_location(name, root / rel)
            made[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(made[name])
    finally:  # leave sys.modules as it was
        for k in [k for k in sys.modules if k.split(".")[0] in tops]:
            del sys.modules[k]
        sys.modules.update(saved)
    return made


def dist_version(root: Path, name: str) -> str:
    """The version in root's `name-VERSION.dist-info` directory (pip --target writes one), else "unknown"."""
    return next((d.name.split("-")[1] for d in root.glob(f"{name}-*.dist-info")), "unknown")


def write_ppo_dump(out: str | Path, tensors: dict, meta: dict) -> None:
    """check.write_dump of the tensors (floating ones as float32) and of `meta` over the settings both
    openrlhf_ppo and verl_ppo run with: the framework's own convention, float32, PPO clip 0.2 either way, value clip
    0.5, token-mean losses, whitened advantages, no missing-EOS penalty, the tiny tokenizer's EOS and pad ids."""
    shared = {"convention": meta["framework"], "dtype": "float32", "clip_low": 0.2, "clip_high": 0.2,
              "value_clip": 0.5, "loss_agg_mode": "token-mean", "missing_eos_penalty": None, "whiten_advantages": True,
              "eos_id": EOS_ID, "pad_id": PAD_ID}
    write_dump(out, {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in tensors.items()},
               {**shared, **meta})


def main(run: Callable[[str, str], None], module: str, root_name: str) -> None:
    """`python3 -m MODULE ROOT OUT.safetensors`: run(ROOT, OUT); a usage or user error is one line and exit 2."""
    if len(sys.argv) != 3:
        print(f"usage: python3 -m {module} {root_name} OUT.safetensors", file=sys.stderr)
        sys.exit(2)
    try:
        run(sys.argv[1], sys.argv[2])
    except MinicaiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {sys.argv[2]} and {Path(sys.argv[2]).with_suffix('.json')}")
