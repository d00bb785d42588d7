"""Wall time of one GRPO iteration: minicai (train_rl.py --advantage grpo) vs TRL's GRPOTrainer, same settings.

Settings: the default model (SmolLM2-135M-Instruct) as policy and reference; the reward model from the same weights
with a scalar head (minicai's RewardModel, TRL's AutoModelForSequenceClassification), which reads each conversation
as text; 4 prompts x 4 responses (G = 4) = 16 responses per iteration, exactly 64 new tokens (no stop token),
temperature 1; group-normalised advantages (GRPO); the KL as a k3 loss term with a fixed beta = 0.04; token-mean
loss over each optimiser step (TRL's default "dapo"); 1 epoch of 2 optimiser steps of 8 responses; old log-probs
recomputed after generation on both sides (TRL does this when steps_per_generation exceeds the accumulation steps,
as here); fp32, 2 threads, no gradient checkpointing. Each side runs in its own subprocess (so peak memory is its
own) for --iterations iterations; the first is a warm-up and the mean of the rest is reported, split into rollout
(generation + old/reference log-probs + reward) and update.

    pip install -r bench/requirements.txt      # trl==1.12.0
    python bench/bench_grpo.py [--iterations 3] [--threads 2]
    python bench/bench_grpo.py --iterations 1 --new-tokens 4 --prompts 2 --group-size 2   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import (ITERATION_ROWS, QUESTIONS, bench_parser, peak_rss_gib, print_result, print_table,  # noqa: E402
                    run_side, start, summarise_iterations)

STEPS, BETA, LR = 2, 0.04, 3e-5  # optimiser steps per iteration, KL coefficient, learning rate


def setup_minicai(model_dir: Path, args, dtype: str = "fp32"):
    """minicai's side, ready to run: (PPOState, the PM, run) where run(i) is iteration i -> (Rollout, stats).
    bf16: fp32 weights for policy and reference, bf16 autocast, the PM stored in bf16 (as train_rl.py)."""
    import functools

    from minicai import precision
    from minicai.model import Transformer
    from minicai.grpo import group_iteration
    from minicai.ppo import PPOConfig, init_state, score_with_pm
    from minicai.reward import RewardModel
    from minicai.run import DTYPES
    from minicai.tokenizer import ChatTokenizer

    run_dtype = DTYPES[dtype]
    batch = args.prompts * args.group_size
    tok = ChatTokenizer.from_dir(model_dir)
    policy = Transformer.from_pretrained(model_dir, fast=True)  # as train_rl.py loads it on the CPU (fast.py)
    ref = precision.frozen_for_autocast(Transformer.from_pretrained(model_dir, fast=True),
                                        precision.amp_dtype(run_dtype))  # as train_rl.py
    pm = RewardModel.from_lm(Transformer.from_pretrained(model_dir, fast=True), head_init="normal", seed=0).eval()
    pm.requires_grad_(False)
    pm.trunk.to(run_dtype)
    cfg = PPOConfig(batch_size=batch, max_new_tokens=args.new_tokens, temperature=1.0, ppo_epochs=1,
                    minibatch_size=batch // STEPS, forward_batch_size=batch, policy_lr=LR, kl_coef=BETA,
                    kl_target=None, advantage="grpo", group_size=args.group_size, kl_in="loss",
                    loss_agg="token-mean")
    state = init_state(policy, ref, None, cfg, amp_dtype=precision.amp_dtype(run_dtype))
    reward_fn = functools.partial(score_with_pm, pm, tok, tok, batch_size=batch)

    def run(i: int):
        questions = [QUESTIONS[(i * args.prompts + j) % len(QUESTIONS)] for j in range(args.prompts)]
        prompt_ids = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
        return group_iteration(state, prompt_ids, questions, reward_fn, cfg, stop_ids=(), pad_id=tok.pad_id, seed=i)

    return state, pm, run


def run_minicai(model_dir: Path, args) -> dict:
    _, _, run = setup_minicai(model_dir, args, args.dtype)
    rows = []
    for i in range(args.iterations):
        start = time.perf_counter()
        ro, stats = run(i)
        assert ro.response_mask.sum(1).eq(args.new_tokens).all(), "every response must have exactly --new-tokens"
        rows.append({"total_s": time.perf_counter() - start, "rollout_s": stats["rollout_s"],
                     "update_s": stats["update_s"]})
        print(f"minicai iteration {i}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"iterations": rows, "peak_rss_gib": peak_rss_gib()}


def run_trl(model_dir: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    batch = args.prompts * args.group_size
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = "<|endoftext|>"  # as in bench_ppo.py: SmolLM2's pad equals its eos
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    for m in (policy, reward):
        m.config.pad_token_id = tok.pad_token_id
    reward_tok = AutoTokenizer.from_pretrained(model_dir)
    reward_tok.pad_token = "<|endoftext|>"
    n_prompts = args.prompts * args.iterations
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": QUESTIONS[j % len(QUESTIONS)]}]
                                            for j in range(n_prompts)]})
    out = tempfile.mkdtemp(prefix="trl_grpo_")
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=batch // STEPS, gradient_accumulation_steps=1,
        steps_per_generation=STEPS, num_generations=args.group_size, num_iterations=1,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, beta=BETA, loss_type="dapo", scale_rewards="group", learning_rate=LR,
        max_steps=STEPS * args.iterations, use_cpu=True, bf16=args.dtype == "bf16", fp16=False, report_to=[],
        save_strategy="no", logging_steps=1000, seed=0, gradient_checkpointing=False, dataloader_num_workers=0,
        shuffle_dataset=False, log_completions=False,
    )
    marks: dict[str, float] = {}
    rows: list[dict] = []
    real_generate_and_score = GRPOTrainer._generate_and_score_completions
    real_generate = GRPOTrainer._generate

    def timed_generate_and_score(self, *a, **k):  # the rollout: generation, old/reference log-probs, rewards
        marks["start"] = time.perf_counter()
        result = real_generate_and_score(self, *a, **k)
        marks["update"] = time.perf_counter()
        # the same work as minicai: every response exactly --new-tokens, old log-probs recomputed, a reference
        assert result["completion_mask"].sum(1).eq(args.new_tokens).all(), "TRL responses must have --new-tokens"
        assert result.get("old_per_token_logps") is not None and result.get("ref_per_token_logps") is not None
        return result

    def timed_generate(self, *a, **k):
        result = real_generate(self, *a, **k)
        marks["generated"] = time.perf_counter()
        return result

    GRPOTrainer._generate_and_score_completions = timed_generate_and_score
    GRPOTrainer._generate = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step % STEPS:
                return
            end = time.perf_counter()
            rows.append({"total_s": end - marks["start"], "rollout_s": marks["update"] - marks["start"],
                         "update_s": end - marks["update"], "generation_s": marks["generated"] - marks["start"]})
            print(f"trl iteration {len(rows) - 1}: {rows[-1]}", file=sys.stderr, flush=True)
            marks.clear()

    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tok, reward_processing_classes=reward_tok, callbacks=[StepTimer()])
    trainer.train()
    return {"iterations": rows, "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=3, help="per side; the first is a warm-up")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--group-size", type=int, default=4, help="responses per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64, help="exact response length")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 mixed precision on both sides (fp32 weights, bf16 autocast)")
    parser.add_argument("--side", choices=["minicai", "trl"], help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if (args.prompts * args.group_size) % STEPS:
        sys.exit(f"error: --prompts x --group-size must be divisible by {STEPS} (optimiser steps per iteration)")
    import torch

    model_dir = start(args)
    if args.side:
        result = (run_minicai if args.side == "minicai" else run_trl)(model_dir, args)
        print_result(result)
        return
    results = {}
    for side in ("minicai", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--iterations", str(args.iterations),
               "--threads", str(args.threads), "--model", str(model_dir), "--prompts", str(args.prompts),
               "--group-size", str(args.group_size), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype]
        results[side] = summarise_iterations(
            run_side(side, cmd, {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}))
        print(f"{side}: {results[side]}", flush=True)
    a, b = results["minicai"], results["trl"]
    print(f"\nmodel {model_dir}; torch {torch.__version__}; {args.threads} threads; {args.dtype}; {args.prompts} "
          f"prompts x {args.group_size} responses, {args.new_tokens} new tokens, 1 epoch of {STEPS} steps, k3 KL in "
          f"the loss (beta {BETA}), token-mean\n")
    print_table(a, b, ITERATION_ROWS)


if __name__ == "__main__":
    main()
