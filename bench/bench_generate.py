"""Decode speed: minicai's KV-cache sampler vs transformers' generate, same weights, same run.

Default model (SmolLM2-135M-Instruct, converted offline), fp32 on the CPU (or --device cuda, --dtype bf16), greedy,
exactly 128 new tokens (no early stop), batch 1 and batch 16 (left-padded prompts of different lengths). Prints
tokens/s for both and the ratio minicai / transformers; --ablation also times minicai without its packed decoding
weights and without the shared prompt prefix.
Usage: python bench/bench_generate.py [--threads 2] [--new-tokens 128] [--repeats 3] [--ablation] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minicai.fast  # noqa: E402
from minicai.fast import keep_freed_memory  # noqa: E402
from minicai.model import Transformer  # noqa: E402
from minicai.sampling import generate  # noqa: E402
from minicai.tokenizer import ChatTokenizer  # noqa: E402
from minicai.weights import resolve_model  # noqa: E402

QUESTIONS = [
    "How do I bake a loaf of sourdough bread at home?", "What is the capital of Australia?",
    "Write a haiku about autumn leaves.", "Explain recursion to a ten-year-old.",
    "Give me three tips for a job interview.", "How does a refrigerator keep food cold?",
    "What are the health benefits of walking every day?", "Summarise the plot of Romeo and Juliet.",
    "How can I make my Python code run faster?", "Why is the sky blue?",
    "Suggest a name for a small bakery.", "What should I pack for a weekend camping trip?",
    "How do vaccines train the immune system?", "Translate 'good morning' into French and Spanish.",
    "What is the difference between weather and climate?", "How do I politely decline a meeting invitation?",
]


PACKED = minicai.fast.PACKED_DECODING


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for it before reading the clock
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF-layout model dir (default: the default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="weights of both sides (default: fp32)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time minicai without packed decoding weights and without the shared prefix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as minicai's scripts do on the CPU (run.setup); transformers runs in this process too
    import transformers

    path = resolve_model(args.model)
    tok = ChatTokenizer.from_dir(path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours = Transformer.from_pretrained(path, dtype=dtype, device=args.device, fast=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    print(f"model {path}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, {args.device}, {args.dtype}, greedy, "
          f"{args.new_tokens} new tokens")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [tok.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True)
                   for i in range(batch)]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)

        def run_ours():
            g = generate(ours, prompts, args.new_tokens, temperature=0, stop_ids=(), pad_id=tok.pad_id)
            assert g.tokens.shape == (batch, args.new_tokens)
            return g

        def run_ref():
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_id)
            assert out.shape == (batch, width + args.new_tokens)
            return out

        # warm-up (also a check that both produce the same greedy tokens)
        g, out = run_ours(), run_ref()
        same = (g.tokens == out[:, width:]).float().mean().item()
        t_ours, t_ref = best_time(run_ours, args.repeats), best_time(run_ref, args.repeats)
        tps_ours, tps_ref = batch * args.new_tokens / t_ours, batch * args.new_tokens / t_ref
        rows.append((batch, tps_ours, tps_ref, tps_ours / tps_ref, same))
        print(f"batch {batch:2d}: minicai {tps_ours:7.1f} tok/s ({t_ours:.2f} s) | transformers {tps_ref:7.1f} tok/s "
              f"({t_ref:.2f} s) | ratio {tps_ours / tps_ref:.2f}x | same greedy tokens {same:.1%}", flush=True)
        if args.ablation:  # what each decoding feature is worth, same run
            for label, packed, share in (("no packed weights", False, True), ("no shared prefix", True, False),
                                         ("neither", False, False)):
                minicai.fast.PACKED_DECODING = packed and PACKED
                t = best_time(lambda: generate(ours, prompts, args.new_tokens, temperature=0, stop_ids=(),
                                               pad_id=tok.pad_id, share_prefix=share), args.repeats)
                minicai.fast.PACKED_DECODING = PACKED
                tps = batch * args.new_tokens / t
                print(f"          minicai, {label:17s} {tps:7.1f} tok/s ({t:.2f} s) | ratio {tps / tps_ref:.2f}x",
                      flush=True)
    print("\n| batch | minicai tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for batch, a, b, r, _ in rows:
        print(f"| {batch} | {a:.1f} | {b:.1f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
