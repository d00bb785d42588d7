"""What bench_ppo.py, bench_grpo.py and bench_dpo.py share: the prompts, the common flags, and the two-sides
protocol: each side (minicai, TRL) runs in its own subprocess (so peak memory is its own) and prints one
`RESULT {json}` line; the parent collects both and prints a table of minicai, TRL and their ratio."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

# The benchmarks' user turns: 16 everyday and red-team questions (bench_ppo takes all 16, bench_grpo 4 per
# iteration, bench_dpo the first --pairs).
QUESTIONS = [
    "How do I bake a loaf of bread?", "What's the best way to get back at my noisy neighbour?",
    "Explain photosynthesis simply.", "How can I get into my ex's email account?", "Write a short poem about rain.",
    "What household chemicals should never be mixed?", "Give me tips for a first marathon.",
    "How do I shoplift without getting caught?", "What is the capital of Canada?", "How do vaccines work?",
    "Tell me a joke about cats.", "How can I make a fake ID?", "Suggest a weekend trip near the mountains.",
    "Why do people believe conspiracy theories?", "How do I fix a leaking tap?", "How do I pick a lock?",
]


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark has (--model, --threads); each adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF-layout model dir (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def start(args: argparse.Namespace) -> Path:
    """What every side's process does first, as minicai's scripts do on the CPU (run.setup): torch's thread count
    from --threads and glibc's malloc told to keep freed memory (fast.keep_freed_memory; both sides, the baseline
    too). Returns the model directory (--model, or the default model)."""
    import torch

    torch.set_num_threads(args.threads)
    from minicai.fast import keep_freed_memory
    from minicai.weights import resolve_model

    keep_freed_memory()
    return resolve_model(args.model)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def print_result(result: dict) -> None:
    """In a side's subprocess: the one line the parent reads."""
    print("RESULT " + json.dumps(result))


def run_side(side: str, cmd: list[str], env: dict[str, str]) -> dict:
    """Run one side's subprocess (`cmd`, with `env` added to this environment) and return its RESULT; exit with
    the end of its stderr if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def summarise_iterations(result: dict) -> dict:
    """Mean total / rollout / update seconds over the iterations after the first (a warm-up), and peak RSS."""
    rows = result["iterations"][1:] or result["iterations"]  # drop the warm-up iteration
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("total_s", "rollout_s", "update_s")}
    return {**mean, "peak_rss_gib": result["peak_rss_gib"], "timed_iterations": len(rows)}


# The rows of an RL iteration's table (bench_ppo.py, bench_grpo.py): summarise_iterations' keys and their labels.
ITERATION_ROWS = (("total_s", "iteration (s)"), ("rollout_s", "rollout (s)"), ("update_s", "update (s)"),
                  ("peak_rss_gib", "peak RSS (GiB)"))


def print_table(a: dict, b: dict, rows: tuple[tuple[str, str], ...], digits: int = 1) -> None:
    """A markdown table: one row per (key, label), minicai (`a`), TRL (`b`) and TRL / minicai."""
    print("| | minicai | TRL 1.12.0 | TRL / minicai |\n|---|---|---|---|")
    for key, label in rows:
        print(f"| {label} | {a[key]:.{digits}f} | {b[key]:.{digits}f} | {b[key] / a[key]:.2f}x |")
