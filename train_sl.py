"""Stage 1 of Constitutional AI: supervised learning from critiques and revisions (Bai et al., 2022, section 3).

Two halves, each resumable, both on by default:

  generate  the helpful model answers red-team prompts, then critiques and revises its answer R times under
            principles drawn at random from the constitution (minicai/critique.py) -> revisions.jsonl;
            it also answers helpfulness prompts -> helpful.jsonl
  train     fine-tune the model on (prompt, revision) pairs mixed with the helpful answers (minicai/sft.py)
            -> model/ (HF layout, with done.json once finished), metrics.jsonl

    python train_sl.py                               # CPU-sized defaults
    python train_sl.py --only generate               # the data half only
    python train_sl.py --data runs/sl/revisions.jsonl --out runs/sl2   # train on an existing revisions file
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from minicai import MinicaiError, distributed, precision, run
from minicai.constitution import (DEFAULT_CONSTITUTION, DEFAULT_CRITIQUE_EXAMPLES, load_constitution,
                                  load_critique_examples)
from minicai.critique import CritiqueSettings, format_record, run_answer_loop, run_critique_loop
from minicai.data import atomic_write_json, publish_dir, read_jsonl, read_prompts
from minicai.presets import suggested_command
from minicai.sft import SFTConfig, build_examples, helpful_pairs, revision_pairs, split_heldout, train_sft

DEFAULTS = CritiqueSettings()  # the CPU-sized generation defaults
SFT = SFTConfig()  # the CPU-sized fine-tuning defaults

GPU_EPILOG = f"""\
suggested GPU setting (one large GPU; the sl stage of `python pipeline.py --preset gpu`, minicai/presets.py):
{suggested_command("train_sl.py", "sl")}
  more prompts: --red-team FILE.jsonl.gz (HH-RLHF transcripts: the first Human turn is the prompt)
  bf16 (the default on cuda): generation runs in bf16; fine-tuning keeps fp32 weights and runs the forward and
  backward passes under bf16 autocast (minicai/precision.py).

outputs (in --out): args.json, revisions.jsonl, helpful.jsonl, metrics.jsonl, model/ (config.json,
model.safetensors, tokenizer files, done.json). A rerun resumes the generation where it stopped and reuses a
finished model/; --force starts the halves it runs from scratch.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SL-CAI (paper section 3): critique -> revision data from the helpful model, then "
                    "supervised fine-tuning on the revisions. Defaults are sized for a CPU.",
        epilog=GPU_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_common_args(p, "runs/sl")
    g = p.add_argument_group("what to run")
    g.add_argument("--only", choices=("generate", "train"), default=None,
                   help="run one half only: generate (revisions.jsonl + helpful.jsonl) or train (needs them)")
    g.add_argument("--data", default=None,
                   help="train on this existing revisions.jsonl instead of generating one (implies --only train)")
    g.add_argument("--helpful-data", default=None,
                   help="helpful answers to mix into training (default: <out>/helpful.jsonl if it exists)")
    g.add_argument("--force", action="store_true",
                   help="discard the outputs of the halves being run and start them afresh")

    g = p.add_argument_group("generation (critique -> revision loop)")
    run.add_prompt_args(g)
    g.add_argument("--num-prompts", type=int, default=32, help="red-team prompts to use, from the top (default: 32)")
    g.add_argument("--num-helpful", type=int, default=None,
                   help="helpfulness prompts to answer and mix in (default: half of --num-prompts)")
    g.add_argument("--rounds", type=int, default=DEFAULTS.rounds,
                   help="critique/revision rounds per prompt (paper: 4; default: 2)")
    g.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION),
                   help="constitution.txt or the paper's CritiqueRevisionInstructions.json (default: constitution.txt)")
    g.add_argument("--examples", default=str(DEFAULT_CRITIQUE_EXAMPLES),
                   help="few-shot critique/revision demonstrations: project JSONL or the paper's "
                        "CritiqueRevisionFewShotPrompts.json (default: data/critique_examples.jsonl)")
    g.add_argument("--num-examples", type=int, default=DEFAULTS.num_examples,
                   help="few-shot demonstrations placed before each critique conversation (default: 1)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="sets --response-tokens, --critique-tokens and --revision-tokens at once")
    g.add_argument("--response-tokens", type=int, default=None,
                   help=f"max new tokens of an initial or helpful answer (default: {DEFAULTS.response_tokens})")
    g.add_argument("--critique-tokens", type=int, default=None,
                   help=f"max new tokens of a critique (default: {DEFAULTS.critique_tokens})")
    g.add_argument("--revision-tokens", type=int, default=None,
                   help=f"max new tokens of a revision (default: {DEFAULTS.revision_tokens})")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help="sampling temperature (paper: 1; default: 1.0)")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                   help="nucleus sampling cut (default: 0.9, trims the tail a small model loses itself in; "
                        "1 = plain temperature sampling)")
    g.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="top-k cut, 0 = off (default: 0)")
    g.add_argument("--gen-batch-size", type=int, default=DEFAULTS.batch_size,
                   help="prompts per generate() call; resume reproduces a run only with the same value (default: 8)")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--revisions", choices=("all", "final"), default="all",
                   help="train on the revision of every round (paper) or only the final one (default: all)")
    g.add_argument("--epochs", type=float, default=SFT.epochs, help="passes over the training split (default: 1)")
    g.add_argument("--steps", type=int, default=SFT.steps, help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=float, default=SFT.lr, help="peak learning rate (default: 2e-5)")
    g.add_argument("--warmup", type=float, default=SFT.warmup,
                   help="warmup: a fraction of the steps if < 1, else a step count (default: 0.1)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=SFT.schedule,
                   help="decay after warmup (default: cosine)")
    g.add_argument("--min-lr-ratio", type=float, default=SFT.min_lr_ratio,
                   help="final lr as a fraction of --lr (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=SFT.weight_decay, help="AdamW weight decay (default: 0)")
    g.add_argument("--clip", type=float, default=SFT.clip, help="gradient-norm clipping, 0 = off (default: 1.0)")
    g.add_argument("--batch-size", type=int, default=SFT.batch_size, help="sequences per micro-batch (default: 4)")
    g.add_argument("--grad-accum", type=int, default=SFT.grad_accum,
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--max-len", type=int, default=192,
                   help="max tokens per example; longer ones lose the end of the response (default: 192)")
    g.add_argument("--heldout", type=float, default=0.1,
                   help="fraction of the SFT examples held out for the per-epoch held-out loss (default: 0.1)")
    args = p.parse_args(argv)

    for name in ("response_tokens", "critique_tokens", "revision_tokens"):
        if getattr(args, name) is None:
            default = getattr(DEFAULTS, name)
            setattr(args, name, args.max_new_tokens if args.max_new_tokens is not None else default)
    if args.num_helpful is None:
        args.num_helpful = args.num_prompts // 2
    if args.data is not None:
        if args.only == "generate":
            p.error("--data trains on an existing file; it cannot go with --only generate")
        args.only = "train"
    for name in ("num_prompts", "num_helpful", "rounds", "num_examples"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("response_tokens", "critique_tokens", "revision_tokens", "gen_batch_size", "batch_size",
                 "grad_accum", "max_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def settings_from(args) -> CritiqueSettings:
    """CritiqueSettings from the flags (same names; --gen-batch-size is its batch_size)."""
    return run.config_from_args(CritiqueSettings, args, batch_size=args.gen_batch_size)


def sft_config_from(args) -> SFTConfig:
    """SFTConfig from the flags (same names)."""
    return run.config_from_args(SFTConfig, args)


def generate_half(args, out: Path, get_model) -> None:
    """Revisions for the red-team prompts and answers to the helpfulness prompts (both resumable)."""
    constitution = load_constitution(args.constitution, require="critiques")
    examples = load_critique_examples(args.examples) if args.num_examples > 0 and args.rounds > 0 else []
    red_team = read_prompts(args.red_team, limit=args.num_prompts)
    helpful = read_prompts(args.helpful, limit=args.num_helpful) if args.num_helpful > 0 else []
    for flag, path, got, asked in (("--red-team", args.red_team, red_team, args.num_prompts),
                                   ("--helpful", args.helpful, helpful, args.num_helpful)):
        if asked > 0 and not got:
            raise MinicaiError(f"{flag} {path}: no prompts in it (fix: point {flag} at a prompt file with at least "
                               f"one prompt, or pass --num-{'prompts' if flag == '--red-team' else 'helpful'} 0)")
    if len(red_team) < args.num_prompts:
        print(f"note: {args.red_team} has only {len(red_team)} prompts (asked for {args.num_prompts})",
              file=sys.stderr)
    settings = settings_from(args)
    model, tok, _ = get_model()
    log = lambda rec: run.log_metrics(out, rec)  # noqa: E731

    t0 = time.perf_counter()
    records = run_critique_loop(model, tok, red_team, constitution.critiques, examples, settings,
                                out / "revisions.jsonl", on_batch=log)
    if helpful:
        run_answer_loop(model, tok, helpful, settings, out / "helpful.jsonl", on_batch=log)
    failed = sum(r["failed"] for rec in records for r in rec["rounds"])
    print(f"generate: {len(records)} red-team prompts x {args.rounds} rounds ({failed} empty revisions), "
          f"{len(helpful)} helpful answers in {time.perf_counter() - t0:.0f}s -> {out / 'revisions.jsonl'}")
    if records:
        print(format_record(records[0]))


def train_half(args, out: Path, get_model, device, dtype) -> None:
    """Fine-tune on the revisions (+ helpful answers) and save model/ with a done.json marker."""
    model_dir = out / "model"
    if (model_dir / "done.json").is_file() and not args.force:
        print(f"train: {model_dir} is finished (done.json); reusing it. Pass --force to train again.")
        return
    data_path = Path(args.data) if args.data else out / "revisions.jsonl"
    if not data_path.is_file():
        raise MinicaiError(f"{data_path}: no revisions file. Fix: run the generate half first "
                           f"(python train_sl.py --only generate --out {out}) or pass --data PATH.")
    records = read_jsonl(data_path, tolerate_partial_last=True)
    helpful_path = Path(args.helpful_data) if args.helpful_data else out / "helpful.jsonl"
    helpful_records = read_jsonl(helpful_path, tolerate_partial_last=True) if (
        args.helpful_data or helpful_path.is_file()) else []
    if not helpful_records:
        print(f"train: no helpful answers ({helpful_path} not found); training on revisions only")
    items = revision_pairs(records, args.revisions) + helpful_pairs(helpful_records)

    if precision.weight_dtype(dtype) == dtype:
        model, tok, path = get_model()
    else:  # a bf16/fp16 run trains float32 weights (minicai/precision.py); the generation model is dropped
        get_model.cache.clear()
        model, tok, path = run.load_model_and_tokenizer(args.model, device, precision.weight_dtype(dtype),
                                                        fast=not args.no_fast)
    examples, dropped = build_examples(tok, items, args.max_len)
    train, heldout = split_heldout(examples, args.heldout, args.seed)
    n_rev = sum(e.source == "revision" for e in examples)
    print(f"train: {n_rev} revision + {len(examples) - n_rev} helpful examples ({dropped} dropped: prompt longer "
          f"than --max-len), {len(train)} train / {len(heldout)} held out")
    cfg = sft_config_from(args)
    summary = train_sft(model, train, heldout, cfg, tok.pad_id, log=lambda rec: run.log_metrics(out, rec),
                        amp_dtype=precision.amp_dtype(dtype))
    summary.update(data=str(data_path), helpful_data=str(helpful_path) if helpful_records else None,
                   revision_examples=n_rev, helpful_examples=len(examples) - n_rev, dropped=dropped,
                   config=asdict(cfg))

    # Save into a temporary folder, mark it done, then move it into place: model/ is complete or absent.
    if not distributed.is_main():  # every process holds the same weights: rank 0 saves them
        distributed.barrier()
        return
    def write(tmp: Path) -> None:
        run.save_model(model, tok, tmp)
        atomic_write_json(tmp / "done.json", summary)

    publish_dir(model_dir, write)  # model/ is complete (with done.json) or absent
    distributed.barrier()
    print(f"train: {summary['steps']} steps, last loss {summary['last_loss']:.4f}, held-out losses "
          f"{[round(x, 4) for x in summary['heldout_losses']]} -> {model_dir}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = run.setup(args)
    out = Path(args.out)
    if args.force and distributed.is_main():
        doomed = []
        if args.only != "train":
            doomed += ["revisions.jsonl", "helpful.jsonl"]
        if args.only != "generate":
            doomed += ["model"]
        if args.only is None:
            doomed += ["metrics.jsonl"]
        run.remove_outputs(out, doomed)
    distributed.barrier()
    out = run.start_run(args, out)

    cache = {}

    def get_model():
        """Load the model once, on first need (a fully reused run never loads it)."""
        if "model" not in cache:
            model, tok, path = run.load_model_and_tokenizer(args.model, device, dtype, fast=not args.no_fast)
            cache["model"] = (model.eval(), tok, path)
        return cache["model"]

    get_model.cache = cache  # train_half drops a bf16/fp16 generation model before it loads float32 weights

    # Under torchrun rank 0 generates the data while the others wait; every process then trains on its share.
    if args.only != "train" and distributed.is_main():
        generate_half(args, out, get_model)
    distributed.barrier()
    if args.only != "generate":
        train_half(args, out, get_model, device, dtype)


if __name__ == "__main__":
    run.cli_main(main)
