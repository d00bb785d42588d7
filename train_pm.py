"""Stage 2 of Constitutional AI: AI feedback and the preference model (Bai et al., 2022, sections 4.1-4.2).

Three steps, each resumable from the file it writes, all on by default:

  pairs   the SL-CAI model (--policy, default runs/sl/model) samples two responses (temperature 1) to each
          red-team and helpfulness prompt -> pairs.jsonl {id, source, prompt, response_a, response_b, seed}
  label   the feedback model (default: the initial helpful model) answers a multiple-choice question per pair,
          under a comparison principle drawn from the constitution; p(A) = softmax over the log-probs of " (A)" and
          " (B)" (minicai/feedback.py), by default averaged over both orders of the options -> labels.jsonl
  train   a preference model (the SL-CAI model + a scalar head, minicai/reward.py) learns the soft labels with the
          Bradley-Terry loss, is evaluated on held-out pairs (accuracy, margin, calibration), normalised to mean 0
          and standard deviation 1 on the policy's held-out samples, and saved -> model/ (HF layout +
          reward_head.safetensors), summary.json

    python train_pm.py                                  # CPU-sized defaults: 96 prompts
    python train_pm.py --policy runs/sl/model --num-red-team 8 --num-helpful 4    # a quick look
    python train_pm.py --only label --force --cot       # relabel the existing pairs with chain of thought
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from minicai import MinicaiError, distributed, precision, run
from minicai.constitution import DEFAULT_COMPARISON_EXAMPLES, DEFAULT_CONSTITUTION, load_comparison_examples, \
    load_constitution
from minicai.data import Resumable, atomic_write_json, publish_dir, read_json, read_jsonl, read_prompts
from minicai.feedback import DEFAULT_COT_FILE, FeedbackConfig, label_pairs, load_cot_examples, position_bias
from minicai.presets import suggested_command
from minicai.reward import (PMTrainConfig, RewardModel, evaluate_preference_model, normalize_scores,
                            train_preference_model)
from minicai.sampling import generate, response_ids

DEFAULT_POLICY = Path("runs/sl/model")
# The CPU-sized defaults of the --pm-* flags. The script picks its own head learning rate and length where
# PMTrainConfig defaults to head_lr = lr and max_len = 384.
PM = PMTrainConfig(head_lr=1e-4, max_len=256)
FEEDBACK = FeedbackConfig()  # the defaults of the AI-feedback flags

GPU_EPILOG = f"""\
suggested GPU setting (one large GPU; the pm stage of `python pipeline.py --preset gpu`, minicai/presets.py):
{suggested_command("train_pm.py", "pm")}

outputs (in --out): args.json, pairs.jsonl, labels.jsonl, metrics.jsonl, summary.json, model/ (config.json,
model.safetensors, tokenizer files, reward_head.safetensors, reward_config.json, done.json). A rerun skips the
pairs and labels already written and reuses a finished model/; --force redoes the steps it runs.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=GPU_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_common_args(p, out_default="runs/pm")
    p.set_defaults(model=None)
    g = p.add_argument_group("what to run")
    g.add_argument("--only", choices=("pairs", "label", "train"), default=None,
                   help="run one step only (default: all three, each skipping finished work)")
    g.add_argument("--force", action="store_true", help="redo the steps being run instead of resuming them")

    g = p.add_argument_group("comparison pairs (paper section 4.1)")
    g.add_argument("--policy", default=None,
                   help=f"the SL-CAI model that samples the responses (default: {DEFAULT_POLICY}; "
                        "run train_sl.py first, or pass any HF-layout model dir)")
    run.add_prompt_args(g)
    g.add_argument("--num-red-team", type=int, default=64, help="red-team prompts, from the top (default: 64)")
    g.add_argument("--num-helpful", type=int, default=32, help="helpfulness prompts, from the top (default: 32)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="max tokens per sampled response (default: 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1; default: 1.0)")
    g.add_argument("--gen-batch-size", type=int, default=8,
                   help="prompts per sampling batch; each gives 2 rows (default: 8)")

    g = p.add_argument_group("AI feedback (paper section 4.1; minicai/feedback.py)")
    g.add_argument("--feedback-model", default=None,
                   help="the model that labels the pairs (default: --model, i.e. the initial helpful model)")
    g.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION),
                   help="comparison principles: constitution.txt format or the paper's RLMadisonInstructions.json "
                        "(default: constitution.txt)")
    g.add_argument("--principles", type=int, default=FEEDBACK.principles,
                   help="principles drawn per comparison; p(A) is averaged over them (paper: 1; default: 1)")
    g.add_argument("--format", choices=("chat", "raw"), default="chat",
                   help="chat: the question is a user turn of the feedback model's chat template, followed by the "
                        "generation prompt and 'The answer is:' (for instruct models; default); raw: the paper's "
                        "plain text, as in 438HHHEvaluations.jsonl")
    g.add_argument("--no-debias", action="store_true",
                   help="ask each question in one order only (the paper's setting); by default it is also asked "
                        "with the responses swapped and the two p(A) are averaged, cancelling position bias")
    g.add_argument("--fewshot", default=str(DEFAULT_COMPARISON_EXAMPLES),
                   help="labelled few-shot comparisons shown before each question: project .jsonl or the paper's "
                        "RLMadisonFewShotPrompts.json, or 'none' (default: data/comparison_examples.jsonl)")
    g.add_argument("--fewshot-count", type=int, default=2,
                   help="how many of them (the first N; alternately answered (A) and (B)) (default: 2)")
    g.add_argument("--cot", action="store_true",
                   help="chain of thought: sample reasoning after \"Let's think step by step:\" first, then score "
                        "the answer; probabilities are clamped; the CoT demos below replace --fewshot in this mode")
    g.add_argument("--cot-fewshot", default=str(DEFAULT_COT_FILE),
                   help="chain-of-thought demos shown before each CoT question (the paper's CoT prompts were "
                        "few-shot): RLMadisonPrecogFewShotPrompts.json layout, or 'none' (default: the paper's file)")
    g.add_argument("--cot-fewshot-count", type=int, default=2,
                   help="how many CoT demos (the first N; the paper's file has 6, about 300 tokens each) (default: 2)")
    g.add_argument("--cot-max-tokens", type=int, default=FEEDBACK.cot_max_tokens,
                   help="max tokens of reasoning (default: 96)")
    g.add_argument("--cot-temperature", type=float, default=FEEDBACK.cot_temperature,
                   help="sampling temperature of the reasoning (default: 1.0)")
    g.add_argument("--clamp-low", type=float, default=FEEDBACK.clamp[0],
                   help="CoT probability clamp, low end (paper: 0.4)")
    g.add_argument("--clamp-high", type=float, default=FEEDBACK.clamp[1],
                   help="CoT probability clamp, high end (paper: 0.6)")
    g.add_argument("--label-batch-size", type=int, default=4,
                   help="pairs labelled (and appended to labels.jsonl) per batch (default: 4)")

    g = p.add_argument_group("preference model (paper section 4.1; minicai/reward.py)")
    g.add_argument("--pm-init", default=None, help="model the PM starts from (default: --policy, the SL-CAI model)")
    g.add_argument("--head-init", choices=("zero", "normal"), default="zero",
                   help="initial scalar head: zero (all scores 0 at the start: no preference; the first step then "
                        "moves only the head) or normal (N(0, 1/(d+1)), as lm-human-preferences) (default: zero)")
    g.add_argument("--pm-epochs", type=int, default=PM.epochs, help="passes over the training pairs (default: 1)")
    g.add_argument("--pm-batch-size", type=int, default=PM.batch_size,
                   help="pairs per step, 2 sequences each (default: 4)")
    g.add_argument("--pm-lr", type=float, default=PM.lr, help="AdamW learning rate of the trunk (default: 1e-5)")
    g.add_argument("--pm-head-lr", type=float, default=PM.head_lr,
                   help="learning rate of the scalar head (a fresh layer; default: 1e-4)")
    g.add_argument("--pm-warmup", type=int, default=PM.warmup_steps, help="linear warm-up steps (default: 0)")
    g.add_argument("--pm-max-len", type=int, default=PM.max_len,
                   help="max tokens per conversation; longer ones lose their start (default: 256)")
    g.add_argument("--eval-pairs", type=int, default=16, help="labelled pairs held out for evaluation (default: 16)")
    g.add_argument("--no-normalize", action="store_true",
                   help="keep raw scores; by default an offset and a scale are stored so the PM's scores of the "
                        "policy's held-out samples have mean 0 and standard deviation 1 (the RL stage then starts "
                        "near reward 0, and --kl-coef means the same for every PM)")
    args = p.parse_args(argv)
    for name in ("num_red_team", "num_helpful", "fewshot_count", "cot_fewshot_count", "eval_pairs", "pm_warmup"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("max_new_tokens", "gen_batch_size", "principles", "label_batch_size", "pm_epochs",
                 "pm_batch_size", "pm_max_len", "cot_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.clamp_low <= args.clamp_high <= 1.0:
        p.error("need 0 <= --clamp-low <= --clamp-high <= 1")
    if args.num_red_team + args.num_helpful == 0:
        p.error("no prompts: --num-red-team and --num-helpful are both 0")
    return args


def resolve_policy(args) -> Path:
    path = Path(args.policy) if args.policy else DEFAULT_POLICY
    if not (path / "config.json").is_file():
        if args.policy is None:
            raise MinicaiError(f"{path}: no SL-CAI model (fix: run train_sl.py first or pass --policy DIR)")
        raise MinicaiError(f"--policy {path}: no HF-layout model there (config.json missing); pass a model dir")
    return path


def load(path, device, dtype, fast: bool = True):
    """(model, tokenizer) of a model directory (None: the default model)."""
    model, tok, _ = run.load_model_and_tokenizer(str(path) if path is not None else None, device, dtype, fast)
    return model.eval(), tok




# ---------------------------------------------------------------------------------------------------------------------
# Step 1: comparison pairs


def collect_prompts(args) -> list[dict]:
    red = read_prompts(args.red_team, limit=args.num_red_team) if args.num_red_team else []
    helpful = read_prompts(args.helpful, limit=args.num_helpful) if args.num_helpful else []
    for name, got, want in (("--red-team", red, args.num_red_team), ("--helpful", helpful, args.num_helpful)):
        if len(got) < want:
            print(f"note: {name} has only {len(got)} prompts (asked for {want})", file=sys.stderr)
    items = [("red_team", p) for p in red] + [("helpful", p) for p in helpful]
    return [{"id": i, "source": s, "prompt": p} for i, (s, p) in enumerate(items)]


def make_pairs(args, out: Path, policy_path: Path, device, dtype) -> list[dict]:
    """Two temperature-1 samples of the policy per prompt -> pairs.jsonl (appended per batch; done ids skipped).

    Batch b holds prompts [b*G, (b+1)*G) and is sampled with a seed derived from (args.seed, b), stored in each
    record. The policy renders each prompt with its own chat template."""
    path = out / "pairs.jsonl"
    prompts = collect_prompts(args)

    def same_prompt(n: int, rec: dict) -> None:
        pid = rec["id"]
        if pid < len(prompts) and rec["prompt"] != prompts[pid]["prompt"]:
            raise MinicaiError(f"{path}: pair {pid} was made from another prompt than the current prompt list "
                               f"(fix: use a fresh --out, or --force to start the pairs again)")

    done = Resumable(path, key=lambda rec: rec["id"], check=same_prompt)
    G = args.gen_batch_size
    batches = [prompts[s : s + G] for s in range(0, len(prompts), G)]
    todo = [(b, batch) for b, batch in enumerate(batches) if any(p["id"] not in done for p in batch)]
    if todo:
        model, tok = load(policy_path, device, dtype, fast=not args.no_fast)
        bar = tqdm(total=sum(len(batch) for _, batch in todo), desc="pairs", unit="prompt")
        for b, batch in todo:
            t0 = time.perf_counter()
            seed = random.Random(f"{args.seed}:pairs:{b}").randrange(2**31)
            ids = [tok.render([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True) for p in batch]
            gen = generate(model, [x for x in ids for _ in range(2)], args.max_new_tokens,
                           temperature=args.temperature, stop_ids=tok.stop_ids, pad_id=tok.pad_id, seed=seed)
            for i, p in enumerate(batch):
                if p["id"] in done:
                    continue
                first, second = (tok.decode(response_ids(gen, 2 * i + k, tok.stop_ids)).strip() for k in (0, 1))
                rec = {**p, "response_a": first, "response_b": second, "seed": seed, "batch": b,
                       "finished": [bool(gen.finished[2 * i]), bool(gen.finished[2 * i + 1])]}
                done.add(rec)
            bar.update(len(batch))
            run.log_metrics(out, {"stage": "pairs", "batch": b, "prompts": len(batch),
                                  "tokens": int(gen.mask.sum()), "seconds": round(time.perf_counter() - t0, 2)})
        bar.close()
        del model
        gc.collect()
    pairs = [done[p["id"]] for p in prompts if p["id"] in done]
    print(f"pairs: {len(pairs)} prompts x 2 samples -> {path}")
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Step 2: AI feedback labels


def feedback_config(args) -> FeedbackConfig:
    examples = []
    if args.fewshot.lower() != "none" and args.fewshot_count > 0 and not args.cot:
        examples = load_comparison_examples(args.fewshot)[: args.fewshot_count]
    cot_examples = []
    if args.cot and args.cot_fewshot.lower() != "none" and args.cot_fewshot_count > 0:
        cot_examples = load_cot_examples(args.cot_fewshot)[: args.cot_fewshot_count]
    return run.config_from_args(FeedbackConfig, args, chat=args.format == "chat", debias=not args.no_debias,
                                clamp=(args.clamp_low, args.clamp_high), examples=examples, cot_examples=cot_examples,
                                batch_size=max(2, 2 * args.label_batch_size))  # and --principles, --cot, --cot-*


def make_labels(args, out: Path, pairs: list[dict], device, dtype) -> list[dict]:
    """Label every pair with the feedback model -> labels.jsonl (appended per batch; done ids skipped)."""
    path = out / "labels.jsonl"
    principles = load_constitution(args.constitution, require="comparisons").comparisons
    cfg = feedback_config(args)
    done = Resumable(path, key=lambda rec: rec["id"])
    todo = [p for p in pairs if p["id"] not in done]
    if todo:
        model, tok = load(args.feedback_model or args.model, device, dtype, fast=not args.no_fast)
        bar = tqdm(total=len(todo), desc="labels", unit="pair")
        for s in range(0, len(todo), args.label_batch_size):
            t0 = time.perf_counter()
            batch = todo[s : s + args.label_batch_size]
            records = label_pairs(model, tok, batch, principles, cfg, seed=args.seed)
            for rec in records:
                done.add(rec)
            bar.update(len(batch))
            run.log_metrics(out, {"stage": "labels", "pairs": len(batch),
                                  "mean_p_a": sum(r["p_a"] for r in records) / len(records),
                                  "mean_p_a_first": sum(r["p_a_first"] for r in records) / len(records),
                                  "seconds": round(time.perf_counter() - t0, 2)})
        bar.close()
        del model
        gc.collect()
    labels = [done[p["id"]] for p in pairs if p["id"] in done]
    bias = position_bias(labels)
    print(f"labels: {len(labels)} pairs -> {path}")
    if bias:
        agree = bias["order_agreement"]
        print(f"  position bias: mean p(first option) {bias['mean_p_first']:.3f}, first option preferred in "
              f"{bias['share_first_preferred']:.1%} of {bias['questions']} questions"
              + (f", both orders agree in {agree:.1%}" if agree is not None else "")
              + f"; mean label p(A) {bias['mean_label']:.3f}")
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Step 3: the preference model


def split(labels: list[dict], eval_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of the labelled pairs; the last eval_pairs are held out."""
    order = sorted(labels, key=lambda r: r["id"])
    random.Random(f"{seed}:split").shuffle(order)
    k = min(eval_pairs, max(len(order) - 1, 0))
    return order[: len(order) - k], order[len(order) - k :]


def train_pm(args, out: Path, labels: list[dict], policy_path: Path, device, dtype) -> dict:
    from minicai.tokenizer import ChatTokenizer

    model_dir = out / "model"
    train, held_out = split(labels, args.eval_pairs, args.seed)
    if not train:
        raise MinicaiError("no labelled pairs to train on (fix: label some pairs first, or raise the prompt counts)")
    cfg = run.config_from_args(PMTrainConfig, args, prefix="pm_", warmup_steps=args.pm_warmup, seed=args.seed)
    train_dtype, amp = precision.weight_dtype(dtype), precision.amp_dtype(dtype)  # fp32 weights, autocast
    if (model_dir / "done.json").is_file() and not args.force:
        print(f"train: {model_dir} is finished (done.json); reusing it. Pass --force to train again.")
        rm = RewardModel.from_pretrained(model_dir, dtype=dtype, device=device, fast=not args.no_fast)
        tok = ChatTokenizer.from_dir(model_dir)
        history = []
    else:
        init = Path(args.pm_init) if args.pm_init else policy_path
        lm, tok = load(init, device, train_dtype, fast=not args.no_fast)  # fp32 weights; bf16/fp16: autocast
        rm = RewardModel.from_lm(lm, head_init=args.head_init, seed=args.seed)
        steps = args.pm_epochs * -(-len(train) // args.pm_batch_size)
        print(f"train: PM from {init} on {len(train)} pairs ({steps} steps), {len(held_out)} held out")
        bar = tqdm(total=steps, desc="pm", unit="step", disable=not distributed.is_main())

        def on_step(m):
            run.log_metrics(out, {"stage": "pm", **m})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")

        history = train_preference_model(rm, tok, train, cfg, on_step=on_step, amp_dtype=amp)
        bar.close()
    with precision.autocast(device, amp):
        metrics = evaluate_preference_model(rm, tok, held_out, batch_size=args.pm_batch_size,
                                            max_len=args.pm_max_len) if held_out else {"n": 0}
    scores = metrics.pop("r_a", []) + metrics.pop("r_b", [])
    if history:  # a fresh model: normalise on the policy's held-out samples (scored with offset 0, scale 1), save
        if not args.no_normalize:
            normalize_scores(rm, scores)
        if distributed.is_main():  # every process holds the same weights: rank 0 saves them
            save_pm(rm, tok, model_dir, {"config": asdict(cfg), "train_pairs": len(train), "steps": len(history)})
        distributed.barrier()
    metrics["offset"], metrics["scale"] = rm.offset, rm.scale
    run.log_metrics(out, {"stage": "pm_eval", **{k: v for k, v in metrics.items() if k != "calibration"}})
    if held_out:
        print(f"  held-out: accuracy {metrics['accuracy']:.3f} (ties wrong), mean margin {metrics['mean_margin']:.3f}, "
              f"loss {metrics['loss']:.3f}, calibration error {metrics['calibration_error']:.3f}, "
              f"offset {rm.offset:.3f}, scale {rm.scale:.3f} -> {model_dir}")
        for row in metrics["calibration"]:
            print(f"    predicted p(A) in [{row['bin'][0]:.1f}, {row['bin'][1]:.1f}): n={row['count']:3d} "
                  f"mean predicted {row['predicted']:.3f}  mean label {row['label']:.3f}")
    return {"train_pairs": len(train), "held_out": metrics, "steps": len(history) or None,
            "last_loss": history[-1]["loss"] if history else None}


def save_pm(rm: RewardModel, tok, model_dir: Path, done: dict) -> None:
    """model/ with the PM, its tokenizer and done.json, complete or absent (data.publish_dir)."""
    def write(tmp: Path) -> None:
        rm.save_pretrained(tmp)
        tok.save(tmp)
        atomic_write_json(tmp / "done.json", done)

    publish_dir(model_dir, write)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = run.setup(args)
    out = Path(args.out)
    steps = ("pairs", "label", "train") if args.only is None else (args.only,)
    if args.force and distributed.is_main():
        doomed = {"pairs": ["pairs.jsonl", "labels.jsonl"], "label": ["labels.jsonl"], "train": ["model"]}
        run.remove_outputs(out, [name for step in steps for name in doomed[step]])
    policy_path = resolve_policy(args) if ("pairs" in steps or ("train" in steps and not args.pm_init)) else None
    if "label" in steps:  # read the feedback model's input files first: a bad one stops before anything is written
        feedback_config(args), load_constitution(args.constitution, require="comparisons")
    distributed.barrier()
    out = run.start_run(args, out)
    t0 = time.perf_counter()
    timings = {}
    if "pairs" in steps:
        # under torchrun rank 0 samples (and below labels) while the others wait, then they read its files
        pairs = run.main_first(lambda: make_pairs(args, out, policy_path, device, dtype))
    else:
        pairs = read_jsonl(out / "pairs.jsonl", tolerate_partial_last=True) if (out / "pairs.jsonl").is_file() else []
        if not pairs and "label" in steps:
            raise MinicaiError(f"{out / 'pairs.jsonl'}: no pairs (fix: run the pairs step first: python train_pm.py "
                               f"--only pairs --out {out})")
    timings["pairs"] = round(time.perf_counter() - t0, 1)
    if "label" in steps:
        labels = run.main_first(lambda: make_labels(args, out, pairs, device, dtype))
    else:
        labels = read_jsonl(out / "labels.jsonl", tolerate_partial_last=True) if (
            out / "labels.jsonl").is_file() else []
    timings["labels"] = round(time.perf_counter() - t0 - timings["pairs"], 1)
    old = out / "summary.json"  # a partial run (--only) keeps what earlier steps reported
    summary = read_json(old, "delete the file; it is rewritten") if old.is_file() else {}
    summary.update({"pairs": len(pairs), "labels": len(labels), "position_bias": position_bias(labels)})
    if labels:
        summary["label_stats"] = {
            "share_a_preferred": sum(r["p_a"] > 0.5 for r in labels) / len(labels),
            "mean_confidence": sum(abs(r["p_a"] - 0.5) for r in labels) / len(labels),
        }
    if "train" in steps:
        if not labels:
            raise MinicaiError(f"{out / 'labels.jsonl'}: no labels (fix: run the label step first: python "
                               f"train_pm.py --only label --out {out})")
        summary["pm"] = train_pm(args, out, labels, policy_path, device, dtype)
        timings["train"] = round(time.perf_counter() - t0 - timings["pairs"] - timings["labels"], 1)
    summary["seconds"] = {**summary.get("seconds", {}), **timings}
    if distributed.is_main():
        atomic_write_json(out / "summary.json", summary)
    print(f"summary -> {out / 'summary.json'} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    run.cli_main(main)
