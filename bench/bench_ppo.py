"""Wall time of one PPO iteration: minicai vs TRL's PPOTrainer, same models and settings, in one run.

Settings (from the RL issue): the default model (SmolLM2-135M-Instruct) as policy and reference; preference model
and value model from the same weights with a scalar head; 16 prompts, exactly 64 new tokens (no stop token),
temperature 1, 1 PPO epoch, 4 minibatches of 4, fp32, 2 threads, no gradient checkpointing. --dtype bf16: both
sides keep fp32 weights and run under bf16 autocast (minicai: minicai/precision.py, the PM stored in bf16; TRL:
bf16=True). The rollout (generation
and the no-grad forward passes) takes --rollout-batch rows at a time on both sides: TRL's
local_rollout_forward_batch_size, minicai's forward_batch_size and PM batch. The default, 16 (the whole batch), is
what TRL's own default (64) does with 16 prompts. (TRL also generates --rollout-batch rows at a time; minicai's
sampler always takes the whole batch.) Each side runs in its own subprocess (so peak memory is its own) for
--iterations iterations; the first is a warm-up and the mean of the rest is reported, split into rollout
(generation + policy/reference/value/reward forwards) and update.

The floor: minicai's iteration counted in matrix-product FLOPs (from the model's shapes and the run's token counts,
as BENCHMARKS.md does) at the product rate this host reaches in the run's dtype, plus generation at the rate this
host streams the weights (one decoding step reads every weight once). Both rates are measured by this script in the
same run (hosts differ), and the result prints the iteration time / floor ratio.

    pip install -r bench/requirements.txt      # trl==1.12.0, the last TRL release with a PPO trainer
    python bench/bench_ppo.py [--iterations 3] [--threads 2] [--rollout-batch 16] [--dtype bf16]
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

BATCH, NEW_TOKENS, MINIBATCHES = 16, 64, 4


def setup_minicai(model_dir: Path, rollout_batch: int, dtype: str = "fp32"):
    """minicai's side, ready to run: (PPOState, the PM, run) where run(i) is iteration i -> (Rollout, stats)."""
    import functools

    from minicai import precision
    from minicai.model import Transformer
    from minicai.ppo import PPOConfig, init_state, make_value_model, ppo_iteration, score_with_pm
    from minicai.reward import RewardModel
    from minicai.run import DTYPES
    from minicai.tokenizer import ChatTokenizer

    run_dtype = DTYPES[dtype]  # as train_rl.py: fp32 weights for policy, reference and value model; the PM in run_dtype
    tok = ChatTokenizer.from_dir(model_dir)
    weights = precision.weight_dtype(run_dtype)
    policy = Transformer.from_pretrained(model_dir, dtype=weights, fast=True)  # as the scripts load it on the CPU
    ref = precision.frozen_for_autocast(Transformer.from_pretrained(model_dir, dtype=weights, fast=True),
                                        precision.amp_dtype(run_dtype))  # as train_rl.py
    pm = RewardModel.from_lm(Transformer.from_pretrained(model_dir, fast=True), head_init="normal", seed=0).eval()
    value, _ = make_value_model(policy, tok, pm, tok)
    pm.trunk.to(run_dtype)
    cfg = PPOConfig(batch_size=BATCH, max_new_tokens=NEW_TOKENS, ppo_epochs=1, minibatch_size=BATCH // MINIBATCHES,
                    forward_batch_size=rollout_batch,
                    temperature=1.0)
    state = init_state(policy, ref, value, cfg, amp_dtype=precision.amp_dtype(run_dtype))
    prompt_ids = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    reward_fn = functools.partial(score_with_pm, pm, tok, tok, batch_size=rollout_batch)

    def run(i: int):
        return ppo_iteration(state, prompt_ids, list(QUESTIONS), reward_fn, cfg, stop_ids=(), pad_id=tok.pad_id,
                             seed=i)

    run.floor = functools.partial(floor_terms, policy.config, prompt_ids, cfg)
    return state, pm, run


def run_minicai(model_dir: Path, iterations: int, rollout_batch: int, dtype: str = "fp32") -> dict:
    state, _, run = setup_minicai(model_dir, rollout_batch, dtype)
    rows = []
    for i in range(iterations):
        start = time.perf_counter()
        ro, stats = run(i)
        assert ro.response_mask.sum(1).eq(NEW_TOKENS).all(), f"every response must have exactly {NEW_TOKENS} tokens"
        rows.append({"total_s": time.perf_counter() - start, "rollout_s": stats["rollout_s"],
                     "update_s": stats["update_s"]})
        print(f"minicai iteration {i}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"iterations": rows, "peak_rss_gib": peak_rss_gib(), "ratio_first_maxdev": stats["ratio_first_maxdev"],
            "floor": run.floor()}


# ---------------------------------------------------------------------------------------------------------------------
# The floor: products at the host's product rate, generation at the host's weight-streaming rate


def layer_shapes(c) -> list[tuple[int, int]]:
    """(in, out) of every weight product of one transformer layer."""
    h, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [(c.hidden_size, h), (c.hidden_size, kv), (c.hidden_size, kv), (h, c.hidden_size),
            (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
            (c.intermediate_size, c.hidden_size)]


def floor_terms(c, prompt_ids: list[list[int]], cfg) -> dict:
    """minicai's matrix-product FLOPs in one iteration, counted as BENCHMARKS.md does: 2 x (weights) per token through
    the layers, 2 x hidden x vocab per position whose log-probs are needed; a backward pass costs 2 forwards (the
    input's and the weights' gradients). The PM is counted as the value model (the same trunk, about the same tokens).
    Also the weight count one decoding step reads (generation: one step per new token)."""
    from minicai.model import shared_prefix_length

    per_token = 2 * c.num_layers * sum(i * o for i, o in layer_shapes(c))  # FLOPs
    head = 2 * c.hidden_size * c.vocab_size
    B, N = len(prompt_ids), cfg.max_new_tokens
    L = shared_prefix_length(prompt_ids) if cfg.share_prefix else 0
    rows = sum(len(p) - L for p in prompt_ids) + B * (N - 1)  # each row's own tokens (the last one predicts nothing)
    rollout_passes = 1 + -(-(B - cfg.minibatch_size) // cfg.forward_batch_size)
    update_passes = cfg.ppo_epochs * -(-B // cfg.minibatch_size)
    rollout_tokens, update_tokens = rows + rollout_passes * L, cfg.ppo_epochs * rows + update_passes * L
    flops = (2 * (rollout_tokens * per_token + B * N * head)  # policy and reference
             + 2 * rollout_tokens * per_token  # value model and PM
             + 3 * (update_tokens * per_token + cfg.ppo_epochs * B * N * head)  # policy: forward + backward
             + 3 * update_tokens * per_token)  # value model
    weights = c.num_layers * sum(i * o for i, o in layer_shapes(c)) + c.hidden_size * c.vocab_size
    return {"product_flops": flops, "decode_steps": N, "decode_weights": weights, "tokens_per_pass": rollout_tokens}


def measure_rates(c, dtype: str, repeats: int = 5) -> dict:
    """This host's product rate (GFLOP/s: one layer's weight products at 330 rows, a PPO minibatch's tokens) and
    weight-streaming rate (GB/s: the same products at 16 rows, a decoding step of the benchmark's batch), in the
    run's dtype, best of `repeats`. bf16: bf16 operands, as autocast feeds them."""
    import torch
    import torch.nn.functional as F

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, i, generator=g) * 0.02).to(dt) for i, o in layer_shapes(c)]
    out = {}
    for rows, key in ((330, "product_gflops"), (BATCH, "stream_gbps")):
        xs = [torch.randn(rows, w.shape[1], generator=g).to(dt) for w in weights]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(4):
                for x, w in zip(xs, weights):
                    F.linear(x, w)
            best = min(best, (time.perf_counter() - start) / 4)
        flops = sum(2 * rows * w.numel() for w in weights)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        out[key] = flops / best / 1e9 if key == "product_gflops" else nbytes / best / 1e9
    return out


def floor_seconds(terms: dict, rates: dict, dtype: str) -> dict:
    bytes_per = 2 if dtype == "bf16" else 4
    products = terms["product_flops"] / (rates["product_gflops"] * 1e9)
    generation = terms["decode_steps"] * terms["decode_weights"] * bytes_per / (rates["stream_gbps"] * 1e9)
    return {"products_s": products, "generation_s": generation, "floor_s": products + generation}


def run_trl(model_dir: Path, iterations: int, rollout_batch: int, dtype: str = "fp32") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tok = AutoTokenizer.from_pretrained(model_dir)
    # SmolLM2's pad equals its eos, and TRL drops pad ids from the attention mask: pad with <|endoftext|> (id 0).
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id
    policy.generation_config.pad_token_id = tok.pad_token_id
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
           for q in QUESTIONS]
    dataset = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in ids]})
    out = tempfile.mkdtemp(prefix="trl_ppo_")
    args = PPOConfig(
        output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES, num_ppo_epochs=1, response_length=NEW_TOKENS, temperature=1.0,
        total_episodes=BATCH * iterations, local_rollout_forward_batch_size=rollout_batch,
        stop_token=None, missing_eos_penalty=None, num_sample_generations=0, learning_rate=3e-5, use_cpu=True,
        bf16=dtype == "bf16", fp16=False, report_to=[], save_strategy="no", logging_steps=1000, seed=0,
        gradient_checkpointing=False, dataloader_num_workers=0,
    )
    marks: dict[str, float] = {}
    rows: list[dict] = []
    real_generation, real_np = trl_ppo.batch_generation, trl_ppo.np

    def timed_generation(*a, **k):  # the rollout starts with generation
        marks["start"] = time.perf_counter()
        result = real_generation(*a, **k)
        marks["generated"] = time.perf_counter()
        return result

    class TimedNumpy:  # the update phase starts with the first minibatch permutation
        def __getattr__(self, name):
            return getattr(real_np, name)

    class Random:
        def __getattr__(self, name):
            return getattr(real_np.random, name)

        @staticmethod
        def permutation(n):
            marks.setdefault("update", time.perf_counter())
            return real_np.random.permutation(n)

    timed_np = TimedNumpy()
    timed_np.random = Random()
    trl_ppo.batch_generation, trl_ppo.np = timed_generation, timed_np

    class StepTimer(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            end = time.perf_counter()
            rows.append({"total_s": end - marks["start"], "rollout_s": marks["update"] - marks["start"],
                         "update_s": end - marks["update"], "generation_s": marks["generated"] - marks["start"]})
            print(f"trl iteration {len(rows) - 1}: {rows[-1]}", file=sys.stderr, flush=True)
            marks.clear()

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[StepTimer()])
    trainer.train()
    return {"iterations": rows, "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    global BATCH, NEW_TOKENS
    parser = bench_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=3, help="per side; the first is a warm-up")
    parser.add_argument("--rollout-batch", type=int, default=BATCH,
                        help="rows per generation / rollout forward pass, both sides (TRL: local_rollout_forward_batch_"
                             "size; its default 64 covers all 16 rows)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 mixed precision on both sides (fp32 weights, bf16 autocast)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check that both sides run: 4 prompts, 8 new tokens (timings meaningless)")
    parser.add_argument("--side", choices=["minicai", "trl"], help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.smoke:
        BATCH, NEW_TOKENS = 4, 8
        del QUESTIONS[BATCH:]
    import torch

    model_dir = start(args)
    if args.side:
        run = run_minicai if args.side == "minicai" else run_trl
        result = run(model_dir, args.iterations, min(args.rollout_batch, BATCH), args.dtype)
        if args.side == "minicai":  # this host's rates, measured in the same run
            from minicai.checkpoint import load_config

            result["rates"] = measure_rates(load_config(model_dir), args.dtype)
        print_result(result)
        return
    results = {}
    for side in ("minicai", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--iterations", str(args.iterations),
               "--threads", str(args.threads), "--model", str(model_dir),
               "--rollout-batch", str(args.rollout_batch), "--dtype", args.dtype] + (["--smoke"] if args.smoke else [])
        raw = run_side(side, cmd, {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"})
        results[side] = summarise_iterations(raw)
        if side == "minicai":
            rates, terms = raw["rates"], raw["floor"]
            floor = floor_seconds(terms, rates, args.dtype)
            print(f"minicai: ratio before the first update exactly 1: {raw['ratio_first_maxdev'] == 0.0}", flush=True)
        print(f"{side}: {results[side]}", flush=True)
    a, b = results["minicai"], results["trl"]
    print(f"\nmodel {model_dir}; torch {torch.__version__}; {args.threads} threads; {args.dtype}"
          f"{' (fp32 weights, bf16 autocast, both sides)' if args.dtype == 'bf16' else ''}; batch {BATCH}, "
          f"{NEW_TOKENS} new tokens, 1 epoch, {MINIBATCHES} minibatches, rollout batch {args.rollout_batch}")
    print(f"this host, {args.dtype}: products {rates['product_gflops']:.0f} GFLOP/s (a layer's weights, 330 rows), "
          f"weight streaming {rates['stream_gbps']:.1f} GB/s (16 rows)")
    print(f"floor: {terms['product_flops'] / 1e12:.2f} TFLOP of products in {floor['products_s']:.1f} s + generation "
          f"{floor['generation_s']:.1f} s = {floor['floor_s']:.1f} s; minicai's iteration / floor = "
          f"{a['total_s'] / floor['floor_s']:.2f}x\n")
    print_table(a, b, ITERATION_ROWS)


if __name__ == "__main__":
    main()
