"""What bench_ppo.py, bench_grpo.py and bench_dpo.py share: each side (minicai, TRL) runs in its own subprocess
(so peak memory is its own) and prints one `RESULT {json}` line; the parent collects both and prints a table of
minicai, TRL and their ratio."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys


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


def print_table(a: dict, b: dict, rows: tuple[tuple[str, str], ...], digits: int = 1) -> None:
    """A markdown table: one row per (key, label), minicai (`a`), TRL (`b`) and TRL / minicai."""
    print("| | minicai | TRL 1.12.0 | TRL / minicai |\n|---|---|---|---|")
    for key, label in rows:
        print(f"| {label} | {a[key]:.{digits}f} | {b[key]:.{digits}f} | {b[key] / a[key]:.2f}x |")
