"""RL-CAI (Bai et al. 2022, section 4): reinforcement learning from AI feedback, with PPO.

The SL-CAI model (train_sl.py) is both the initial policy and the frozen reference; the preference model trained on
AI feedback (train_pm.py) gives the reward. Every iteration:

  1. sample a response to each of a batch of prompts, red-team and helpfulness prompts mixed (section 4.1),
  2. reward = PM score of the whole response - beta * KL(policy || reference) on every token (section 4 uses the
     PM score as the reward, with the KL penalty of Ziegler et al. 2019 keeping the policy near the SL-CAI model),
  3. a few epochs of PPO on those episodes (policy and value model), then adapt beta toward the target KL.

--advantage grpo|rloo replaces the value model and GAE by group advantages (GRPO, Shao et al. 2024; RLOO, Ahmadian
et al. 2024): --group-size responses to each prompt, each response's reward compared with its group's, no value
model; the KL in the reward or, with --kl-in loss, as GRPO's k3 loss term (minicai/grpo.py).

Outputs in --out (default runs/rl): args.json, metrics.jsonl (one line per iteration), samples.jsonl (a few
responses per iteration), checkpoints/iter_N/ (policy, value model, optimiser states, beta, iteration counter; a
rerun resumes from the newest one) and model/ (the final policy, HF layout).

    python train_rl.py                                   # runs/sl/model + runs/pm/model -> runs/rl/model
    python train_rl.py --model default --pm /tmp/pm --iterations 2 --threads 1   # a smoke run
    python train_rl.py --advantage grpo --group-size 4 --batch-size 16            # GRPO: 4 prompts x 4 responses
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from pathlib import Path

from tqdm import tqdm

from minicai import MinicaiError, distributed, precision
from minicai.data import append_jsonl, read_jsonl, read_prompts, write_jsonl
from minicai.grpo import group_iteration
from minicai.losses import AGG_MODES, GROUP_SCALES
from minicai.ppo import (
    KL_HORIZON_BATCHES,
    PPOConfig,
    init_state,
    latest_checkpoint,
    load_checkpoint,
    make_value_model,
    mixed_prompt_batch,
    ppo_iteration,
    save_checkpoint,
    score_with_pm,
)
from minicai.presets import suggested_command
from minicai.reward import load_reward_model
from minicai.run import add_common_args, cli_main, config_from_args, load_model_and_tokenizer, log_metrics, \
    save_model, setup, start_run, write_cost

DEFAULTS = PPOConfig()

GPU_EPILOG = f"""\
suggested GPU setting (one large GPU; the rl stage of `python pipeline.py --preset gpu`, minicai/presets.py):
{suggested_command("train_rl.py", "rl")}
"""


def parse_args(argv=None) -> argparse.Namespace:
    D = " (default: %(default)s)"
    p = argparse.ArgumentParser(
        description="RL-CAI (paper section 4): PPO on the preference model's score with a per-token KL penalty\n"
                    "against the SL-CAI model. Resumes from the newest checkpoint in --out.",
        epilog=GPU_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="runs/rl", model_default="runs/sl/model",  # the policy starts from SL-CAI
                    model_help="initial policy and frozen reference: the SL-CAI model (HF layout); 'default' for "
                               "the base model" + D)
    p.add_argument("--pm", default="runs/pm/model", help="preference model directory (train_pm.py's model/)" + D)

    g = p.add_argument_group("prompts")
    g.add_argument("--red-team-prompts", default="red_team_train",
                   help="red-team prompts: .jsonl with 'prompt', HH-RLHF .jsonl(.gz), .txt, or a set name" + D)
    g.add_argument("--helpful-prompts", default="helpful_train", help="helpfulness prompts, same formats" + D)
    g.add_argument("--red-team-fraction", type=float, default=0.5,
                   help="share of red-team prompts in each batch; the rest are helpfulness prompts" + D)
    g.add_argument("--max-prompts", type=int, default=None, help="read at most this many prompts per file" + D)
    g.add_argument("--max-prompt-tokens", type=int, default=160,
                   help="skip prompts whose chat-rendered form is longer than this" + D)

    g = p.add_argument_group("rollouts")
    g.add_argument("--iterations", type=int, default=40, help="PPO iterations (rollout + update) in total" + D)
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help="episodes (responses) per iteration: one per prompt, or --group-size per prompt with "
                        "--advantage grpo/rloo" + D)
    g.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="response length limit" + D)
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help="sampling temperature; the policy's and reference's log-probs use the same one" + D)
    g.add_argument("--pm-batch-size", type=int, default=8, help="conversations per PM forward pass" + D)

    g = p.add_argument_group("PPO")
    g.add_argument("--ppo-epochs", type=int, default=DEFAULTS.ppo_epochs, help="passes over each batch" + D)
    g.add_argument("--minibatch-size", type=int, default=DEFAULTS.minibatch_size, help="rows per gradient step" + D)
    g.add_argument("--forward-batch-size", type=int, default=DEFAULTS.forward_batch_size,
                   help="rows per no-grad forward pass of policy, reference and value model in the rollout (more is "
                        "faster and takes more memory)" + D)
    g.add_argument("--policy-lr", type=float, default=DEFAULTS.policy_lr, help="AdamW learning rate, policy" + D)
    g.add_argument("--value-lr", type=float, default=DEFAULTS.value_lr, help="AdamW learning rate, value model" + D)
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay, both" + D)
    g.add_argument("--clip-ratio", type=float, default=DEFAULTS.clip_ratio, help="PPO clip epsilon" + D)
    g.add_argument("--clip-value", type=float, default=DEFAULTS.clip_value, help="value-function clip range" + D)
    g.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm,
                   help="gradient-norm clip, per network" + D)
    g.add_argument("--gamma", type=float, default=DEFAULTS.gamma, help="discount over response tokens" + D)
    g.add_argument("--lam", type=float, default=DEFAULTS.lam, help="GAE lambda" + D)
    g.add_argument("--whiten-advantages", action=argparse.BooleanOptionalAction, default=DEFAULTS.whiten_advantages,
                   help="normalise advantages to mean 0, variance 1 over each batch" + D)

    g = p.add_argument_group("GRPO / RLOO (--advantage grpo or rloo; no value model: the --value-lr, --clip-value, "
                             "--gamma, --lam and --whiten-advantages flags do not apply)")
    g.add_argument("--advantage", default=DEFAULTS.advantage, choices=["gae", "grpo", "rloo"],
                   help="gae: PPO with a value model and GAE (the paper's RL-CAI); grpo: (R - group mean) / group "
                        "std (Shao et al. 2024, section 4.1.2); rloo: R - mean of the other responses of the group "
                        "(Ahmadian et al. 2024). R: a response's total reward, its advantage on all its tokens" + D)
    g.add_argument("--group-size", type=int, default=DEFAULTS.group_size,
                   help="responses per prompt (G); --batch-size / G prompts per iteration" + D)
    g.add_argument("--group-scale", default=None, choices=list(GROUP_SCALES),
                   help="divide group advantages by the group's std (Bessel), its population std, or nothing "
                        "(Dr. GRPO) (default: std for grpo, none for rloo)")
    g.add_argument("--kl-in", default=DEFAULTS.kl_in, choices=["reward", "loss"],
                   help="reward: -beta * KL_t in the reward, R = score - beta * sum KL (the paper, PPO); loss: "
                        "beta * k3 per token in the loss and R = score (GRPO, Shao et al. eq. 3; --kl-estimator "
                        "applies to the reward only)" + D)
    g.add_argument("--loss-agg", default=DEFAULTS.loss_agg, choices=list(AGG_MODES),
                   help="how per-token losses become the minibatch's loss. token-mean: every token weighs the same. "
                        "seq-mean-token-mean (GRPO as published): each response's token mean, so a token of a "
                        "response of length L weighs 1/L: short responses with positive advantage are favoured and "
                        "long ones with negative advantage penalised less per token, a length bias that lets wrong "
                        "answers grow long (Dr. GRPO, Liu et al. 2025). seq-mean-token-sum: a response weighs its "
                        "length. seq-mean-token-sum-norm: token sum / (rows * --max-new-tokens), a constant "
                        "(Dr. GRPO)" + D)
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward/backward pass in the update (gradient accumulation over a minibatch; "
                        "the loss does not depend on it) (default: --minibatch-size)")

    g = p.add_argument_group("KL penalty")
    g.add_argument("--kl-coef", type=float, default=DEFAULTS.kl_coef, help="initial beta" + D)
    g.add_argument("--kl-target", type=float, default=DEFAULTS.kl_target,
                   help="target KL per response (nats) of the adaptive controller; 0 keeps beta fixed" + D)
    g.add_argument("--kl-horizon", type=float, default=None,
                   help="episodes over which the adaptive controller closes the gap to the target (default: "
                        f"{KL_HORIZON_BATCHES} batches, i.e. {KL_HORIZON_BATCHES} x --batch-size; Ziegler et al.: "
                        "10000 at batch 512)")
    g.add_argument("--kl-estimator", default=DEFAULTS.kl_estimator, choices=["k1", "abs", "k2", "k3"],
                   help="per-token KL estimator (k1 = log pi/pi_ref, as Ziegler et al.)" + D)
    g.add_argument("--truncation-penalty", type=float, default=DEFAULTS.truncation_penalty,
                   help="added to the score of responses that hit --max-new-tokens without a stop token, "
                        "e.g. -1; 0 = off" + D)
    g.add_argument("--logprob-tol", type=float, default=DEFAULTS.logprob_tol,
                   help="max allowed |sampler log-prob - forward log-prob| in float32 (a consistency check; bf16 and "
                        "fp16 runs allow their rounding, minicai/precision.py)" + D)

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every N iterations and at the end (135M model: ~3 GB, optimiser states "
                        "included; only the newest is kept)" + D)
    g.add_argument("--samples", type=int, default=2, help="responses per iteration written to samples.jsonl" + D)
    return p.parse_args(argv)


def ppo_config(args) -> PPOConfig:
    """PPOConfig from the flags (one flag per field, same name; --kl-target 0 means a fixed beta)."""
    return config_from_args(PPOConfig, args, kl_target=args.kl_target or None)


def load_prompt_set(path, tok, limit, max_tokens) -> list[tuple[str, list[int]]]:
    """(user turn, rendered ids with the assistant generation prompt) for each prompt short enough to use."""
    items = []
    for text in read_prompts(path, limit=limit):
        ids = tok.render([{"role": "user", "content": text}], add_generation_prompt=True)
        if len(ids) <= max_tokens:
            items.append((text, ids))
    return items


def keep_iterations_before(file: Path, iteration: int) -> None:
    """On resume, drop log lines of iterations the checkpoint does not contain (they will be redone)."""
    if file.exists() and distributed.is_main():
        records = read_jsonl(file, tolerate_partial_last=True)
        write_jsonl(file, [r for r in records if r.get("iteration", -1) < iteration])


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = setup(args)
    cfg = ppo_config(args)
    if args.save_every < 1 or args.iterations < 1 or not 0 <= args.red_team_fraction <= 1:
        raise MinicaiError("--save-every and --iterations must be >= 1 and --red-team-fraction in [0, 1]")
    out = start_run(args, args.out)
    t_start = time.perf_counter()
    checkpoints = out / "checkpoints"
    last = latest_checkpoint(checkpoints)
    finished = last is not None and int(last.name.split("_")[1]) >= args.iterations
    if finished and (out / "model" / "config.json").exists():
        print(f"{out / 'model'} is finished ({last.name}); nothing to do (raise --iterations to train further)")
        return

    # The SL-CAI model is the initial policy and, frozen, the reference of the KL penalty.
    if args.model not in (None, "default") and not Path(args.model).is_dir():
        raise MinicaiError(f"--model {args.model}: not found. Fix: run train_sl.py first (it writes runs/sl/model), "
                           "or pass --model DIR / --model default")
    # Mixed precision (minicai/precision.py): policy, reference and value model hold float32 weights (the reference
    # takes exactly the policy's passes: KL exactly 0 at iteration 0); a bf16/fp16 run computes under autocast, and
    # the frozen reference stores its blocks' linear weights in that dtype (the same bits, without autocast's casts).
    policy, tok, policy_dir = load_model_and_tokenizer(args.model, device, precision.weight_dtype(dtype),
                                                       fast=not args.no_fast)
    ref_model = precision.frozen_for_autocast(copy.deepcopy(policy), precision.amp_dtype(dtype))
    # The preference model's score is the reward. It reads responses as text, in its own chat template.
    if not Path(args.pm).is_dir():
        raise MinicaiError(f"--pm {args.pm}: not found. Fix: run train_pm.py first (it writes runs/pm/model), "
                           "or pass --pm DIR")
    pm, pm_tok = load_reward_model(args.pm, dtype=precision.weight_dtype(dtype), device=device, fast=not args.no_fast)
    pm.requires_grad_(False).eval()
    grouped = cfg.advantage != "gae"  # GRPO / RLOO: no value model
    value_model, value_init = (None, f"none ({cfg.advantage}: group baseline)") if grouped else \
        make_value_model(policy, tok, pm, pm_tok)  # a float32 copy, trained
    pm.trunk.to(dtype)  # the PM only scores: it may stay in the run's dtype (its head stays float32)
    state = init_state(policy, ref_model, value_model, cfg, amp_dtype=precision.amp_dtype(dtype))
    reward_fn = functools.partial(score_with_pm, pm, pm_tok, tok, batch_size=args.pm_batch_size)
    print(f"policy and reference: {policy_dir}; preference model: {args.pm}; value model: {value_init}")

    # Prompts: red-team and helpfulness prompts, mixed in every batch.
    red = load_prompt_set(args.red_team_prompts, tok, args.max_prompts, args.max_prompt_tokens) \
        if args.red_team_fraction > 0 else []
    helpful = load_prompt_set(args.helpful_prompts, tok, args.max_prompts, args.max_prompt_tokens) \
        if args.red_team_fraction < 1 else []
    if args.red_team_fraction > 0 and not red or args.red_team_fraction < 1 and not helpful:
        raise MinicaiError(f"no usable prompts in {args.red_team_prompts if not red else args.helpful_prompts} "
                           f"(all longer than --max-prompt-tokens {args.max_prompt_tokens}, or the file is empty). "
                           "Fix: pass another file, raise --max-prompt-tokens, or set --red-team-fraction 0 or 1")
    print(f"prompts: {len(red)} red-team, {len(helpful)} helpfulness; {args.red_team_fraction:.0%} red-team per batch")

    if last is not None:
        load_checkpoint(last, state)
        keep_iterations_before(out / "metrics.jsonl", state.iteration)
        keep_iterations_before(out / "samples.jsonl", state.iteration)
        print(f"resumed from {last} (iteration {state.iteration}, beta {state.kl_ctl.beta:.4g})")

    main = distributed.is_main()  # under torchrun: rank 0 writes files and shows the bar; the metrics are global
    bar = tqdm(range(state.iteration, args.iterations), initial=state.iteration, total=args.iterations,
               desc="RL-CAI", dynamic_ncols=True, disable=not main)
    G = cfg.group_size if grouped else 1
    iteration = group_iteration if grouped else ppo_iteration
    for it in bar:
        batch = mixed_prompt_batch(red, helpful, cfg.batch_size // G, args.red_team_fraction, it, args.seed)
        prompts = [text for _, (text, _) in batch]
        prompt_ids = [ids for _, (_, ids) in batch]
        ro, stats = iteration(state, prompt_ids, prompts, reward_fn, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                              seed=args.seed)
        # one per row of this process's rollout: its prompts (all without torchrun), G rows each (row i: prompt i // G)
        local = [batch[i] for i in distributed.my_rows(len(batch)) for _ in range(G)]
        for source in ("red_team", "helpful"):
            rows = [i for i, (s, _) in enumerate(local) if s == source]
            n = distributed.total(len(rows))
            if n:
                stats[f"score_{source}"] = distributed.total(float(ro.scores[rows].sum())) / n
        if not main:
            if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
                distributed.barrier()  # rank 0 writes the checkpoint
            continue
        if it == 0:
            exact = stats["ratio_first_maxdev"] == 0.0 and stats["kl_max_abs"] == 0.0
            tqdm.write(f"check before the first update: max |ratio - 1| = {stats['ratio_first_maxdev']:.3g}, "
                       f"max |log pi - log pi_ref| = {stats['kl_max_abs']:.3g}, sampler vs forward log-prob gap = "
                       f"{stats['sampler_logprob_maxdiff']:.2g} (allowed in {str(state.amp_dtype or dtype)[6:]}: "
                       f"{precision.logprob_tolerance(state.amp_dtype or dtype, cfg.logprob_tol):g})"
                       + ("" if exact else "  (expected exactly 0!)"))
        log_metrics(out, stats)
        for i in range(min(args.samples, len(local))):
            record = {"iteration": it, "source": local[i][0], "prompt": local[i][1][0],
                      "response": tok.decode(ro.responses[i]), "score": float(ro.scores[i]),
                      "finished": bool(ro.finished[i])}
            append_jsonl(out / "samples.jsonl", record)
            tqdm.write(f"[{it}] {record['source']} ({record['score']:+.2f}) {record['prompt'][:80]!r} -> "
                       f"{record['response'][:160]!r}")
        bar.set_postfix(score=f"{stats['score']:+.3f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['beta']:.3g}",
                        len=f"{stats['response_length']:.0f}", t=f"{stats['rollout_s']:.0f}+{stats['update_s']:.0f}s")
        if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
            save_checkpoint(checkpoints, state, tokenizer=tok)
            distributed.barrier()

    if main:
        save_model(state.policy, tok, out / "model")
        cost = write_cost(out, time.perf_counter() - t_start, device, resumed=last is not None)
        print(f"policy saved to {out / 'model'}; {cost['seconds']:.0f}s, peak RSS {cost['peak_rss_mib']:.0f} MiB "
              "-> cost.json")
    distributed.barrier()


if __name__ == "__main__":
    cli_main(main)
