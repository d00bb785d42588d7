"""Evaluate models. Subcommands:

  compare  initial vs SL-CAI vs RL-CAI (or any models) on held-out prompt sets: PM scores, judged win rates and
           Elo (both orders), evasiveness, toxicity, judge strength; writes runs/report/report.md + plots
           (minicai/compare.py runs it, minicai/stats.py holds the statistics, minicai/report.py writes the report;
           the paper's Figures 2, 5 and 8 at small scale); with --kl-reference sl and --cost NAME=FILE it also puts
           each model's KL to the SL-CAI model and each method's wall time and peak memory side by side
           (pipeline.py --rl-methods ppo,dpo,grpo)
  hhh   accuracy on the paper's 438 helpful/honest/harmless binary comparisons (Bai et al. 2022, Figure 4), asked
        as multiple-choice questions and scored with the same code as the AI-feedback labels (minicai/feedback.py).

Usage: python -m minicai.evaluate compare [NAME=DIR ...] [--pm DIR] [--limit N] [--out DIR]
       python -m minicai.evaluate hhh [--model DIR] [--file PATH] [--limit N] [--batch-size B] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from minicai import MinicaiError
from minicai.compare import add_arguments, run_compare
from minicai.data import atomic_write_json
from minicai.feedback import hhh_evaluate, read_hhh
from minicai.run import cli_main, load_model_and_tokenizer, setup

FIGURE_4_CONTEXT = (
    "Context (paper Figure 4): pretrained language models answering the paper's 438 questions as multiple choice get "
    "more accurate with model size, chain-of-thought prompting helps, and the trend suggests that models beyond 52B "
    "parameters match a preference model trained on human feedback. Even the smallest models in that plot are far "
    "larger than a ~100M-parameter model, which should score near chance (0.5): its raw accuracy mostly reflects a "
    "preference for one letter (share answering (A)), which the debiased accuracy removes.")


def add_hhh_parser(sub) -> None:
    p = sub.add_parser("hhh", help="accuracy on the paper's 438 HHH comparisons (Figure 4)",
                       description="Score a causal LM on the paper's HHH multiple-choice comparisons. Accuracy = share "
                                   "of records where the correct answer (' (A)' or ' (B)') has the higher summed "
                                   "log-prob given the prompt. Debiased accuracy also asks each record with its two "
                                   "options swapped and averages P(option) over both orders. " + FIGURE_4_CONTEXT)
    p.add_argument("--model", default=None, help="HF-layout model directory (default: the default model)")
    p.add_argument("--file", default=None,
                   help="the paper's 438HHHEvaluations.jsonl or a file of its layout (default: ../shared's copy, else the "
                        "copy obtained once into ~/.cache/minicai/data)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default: 8)")
    p.add_argument("--format", choices=("raw", "chat"), default="raw",
                   help="raw: the prompt text as in the file (the paper's setting, default); chat: the question as a "
                        "user turn of the model's chat template, then the generation prompt and 'The answer is:'")
    p.add_argument("--no-debias", action="store_true", help="skip the swapped-order pass (half the time)")
    p.add_argument("--out", default=None, help="write a JSON summary here")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16", "fp64"),
                   help="model dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-fast", action="store_true", help="on the CPU, run model.py's reference path (slower)")
    p.set_defaults(func=run_hhh, seed=0)


def run_hhh(args) -> dict:
    device, dtype = setup(args)
    if args.limit is not None and args.limit <= 0:
        raise MinicaiError(f"--limit {args.limit}: must be a positive number of records")
    records = read_hhh(args.file, args.limit)
    model, tok, path = load_model_and_tokenizer(args.model, device, dtype, fast=not args.no_fast)
    total = len(records) * (1 if args.no_debias else 2)
    start = time.time()
    with tqdm(total=total, desc="hhh", unit="q") as bar:
        result = hhh_evaluate(model, tok, records, batch_size=args.batch_size, chat=args.format == "chat",
                              debias=not args.no_debias, progress=lambda n: bar.update(n - bar.n))
    seconds = time.time() - start
    logprobs = result.pop("logprobs")
    summary = {"model": str(path), "file": str(args.file or "default"), **result, "seconds": round(seconds, 1)}
    print(f"model: {path}")
    print(f"records: {result['n']}  format: {result['format']}  time: {seconds:.0f} s")
    print(f"accuracy (raw):      {result['accuracy']:.3f}")
    if "debiased_accuracy" in result:
        print(f"accuracy (debiased): {result['debiased_accuracy']:.3f}")
    print(f"share answering (A): {result['share_a']:.3f}  (mean P(A) {result['mean_p_a']:.3f})")
    print(FIGURE_4_CONTEXT)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, {**summary, "logprobs": logprobs})
        print(f"wrote {out}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minicai.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_hhh_parser(sub)
    add_compare_parser(sub)
    return parser


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare models: PM scores, judged win rates, Elo, evasiveness, toxicity; "
                                       "writes a report", description=run_compare.__doc__)
    add_arguments(p)
    p.set_defaults(func=run_compare)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    cli_main(main)
