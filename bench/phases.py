"""Where the time of one minicai PPO or GRPO iteration goes: timers around its phases, on the benchmarks' settings.

Wraps (at run time, nothing in minicai changes) generation, the rollout's forward passes (policy, reference, value
model, PM), the update's forward passes, the LM head, the log-prob and entropy computations, the backward passes,
gradient clipping and AdamW, and prints each phase's seconds and share of the iteration (the last of --iterations;
the first is a warm-up). Two clocks: wall time and this thread's CPU time (with --threads 1 the latter ignores the
time other processes take the core, so it is the one to read on a shared machine). Nested phases (the LM head inside
a forward pass) are indented under their parent.

    python bench/phases.py --algo ppo --dtype bf16 --threads 1 [--iterations 2]
    python bench/phases.py --algo grpo --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

TIMES: dict[str, list[float]] = {}  # phase -> [wall, cpu], in the order the phases first start
STACK: list[str] = []  # the phases running now
LAST = [""]  # the last top-level phase that ended (names the backward pass that follows a forward pass)


def timed(name, fn):
    """fn, adding its wall and thread CPU time to TIMES[name(args)] (name: a string or a function of the args)."""

    def wrapper(*args, **kwargs):
        key = name if isinstance(name, str) else name(*args, **kwargs)
        path = "/".join(STACK + [key])
        t = TIMES.setdefault(path, [0.0, 0.0])
        STACK.append(key)
        w, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            t[0] += time.perf_counter() - w
            t[1] += time.thread_time() - c
            STACK.pop()
            if not STACK:
                LAST[0] = key

    return wrapper


def instrument(state, pm) -> None:
    from minicai import fast, ppo

    names = {id(state.policy): "policy", id(state.ref_model): "reference"}
    if state.value_model is not None:
        names[id(state.value_model)] = "value"
    names[id(pm)] = "pm"
    mode = lambda: "update" if torch.is_grad_enabled() else "rollout"  # noqa: E731
    ppo.generate = timed("generate", ppo.generate)
    ppo.policy_logprobs = timed(lambda m, *a, **k: f"{mode()} forward {names[id(m)]}", ppo.policy_logprobs)
    ppo.response_values = timed(lambda m, *a, **k: f"{mode()} forward value", ppo.response_values)
    ppo.token_logprobs = timed("token_logprobs", ppo.token_logprobs)
    ppo.entropy_from_logits = timed("entropy", ppo.entropy_from_logits)
    ppo.clip_grad_norm = timed("clip_grad_norm", ppo.clip_grad_norm)
    fast.FastTransformer.logits = timed("lm head", fast.FastTransformer.logits)
    fast.FastTransformer.hidden_states = timed("trunk", fast.FastTransformer.hidden_states)
    pm.forward = timed("pm score", pm.forward)
    torch.Tensor.backward = timed(lambda *a, **k: f"backward ({LAST[0]})", torch.Tensor.backward)
    for opt, who in ((state.policy_opt, "policy"), (state.value_opt, "value")):
        if opt is not None:
            opt.step = timed(f"adamw {who}", opt.step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=["ppo", "grpo"], default="ppo")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2, help="the last one is reported")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    from common import peak_rss_gib, start

    model_dir = start(args)
    if args.algo == "ppo":
        from bench_ppo import BATCH, setup_minicai

        state, pm, run = setup_minicai(model_dir, BATCH, args.dtype)
    else:
        from bench_grpo import setup_minicai

        state, pm, run = setup_minicai(model_dir, argparse.Namespace(prompts=4, group_size=4, new_tokens=64),
                                       args.dtype)
    instrument(state, pm)
    for i in range(args.iterations):
        TIMES.clear()
        w, c = time.perf_counter(), time.thread_time()
        _, stats = run(i)
        total = [time.perf_counter() - w, time.thread_time() - c]
        print(f"iteration {i}: wall {total[0]:.1f} s, cpu {total[1]:.1f} s (rollout {stats['rollout_s']:.1f} s, "
              f"update {stats['update_s']:.1f} s wall); sampler vs forward log-prob max gap "
              f"{stats['sampler_logprob_maxdiff']:.3g}, first ratio exactly 1: {stats['ratio_first_maxdev'] == 0}",
              flush=True)
    print(f"\n{args.algo}, {args.dtype}, {args.threads} thread(s), iteration {args.iterations - 1}:\n"
          f"| phase | wall s | cpu s | cpu share |\n|---|---|---|---|")
    for key, (wall, cpu) in TIMES.items():
        print(f"| {'. ' * key.count('/')}{key.split('/')[-1]} | {wall:.2f} | {cpu:.2f} | {cpu / total[1]:.1%} |")
    print(f"| iteration | {total[0]:.2f} | {total[1]:.2f} | 100% |\n\npeak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
