"""GRPO and RLOO in RL-CAI: critic-free group advantages on the PM's score (train_rl.py --advantage grpo|rloo).

GRPO (Shao et al. 2024, arXiv 2402.03300, section 4.1.2) and RLOO (Ahmadian et al. 2024, arXiv 2402.14740) drop
PPO's value model. One iteration:

1. group_rollout  G responses to each prompt (rows p*G .. p*G+G-1), through ppo.rollout: the same sampling, forward
                  passes and PM scoring as PPO's, without a value model.
2. compute_group_advantages  a response's total reward R_i against its group: (R_i - mean) / std (GRPO) or R_i -
                  mean of the other G - 1 (RLOO), losses.group_advantages; every token of the response gets that
                  one advantage. The KL to the reference goes either into R_i (kl_in="reward": R_i = score - beta *
                  sum_t KL_t, as the paper and PPO have it) or into the loss (kl_in="loss": + beta * k3 per token,
                  GRPO's eq. 3, and R_i = score).
3. grpo_step      PPO's clipped surrogate on those advantages (group_token_loss), reduced by a choice of loss
                  aggregation (micro_batch_loss: the length bias of per-sequence means), the policy alone.

The old log-probs are recomputed in the rollout, whose first forward pass takes the rows of grpo_step's first
micro-batch, so the ratio is exactly 1 before the first step.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from minicai import distributed, precision
from minicai.losses import (
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    masked_mean,
    per_token_rewards,
    ppo_policy_loss,
)
from minicai.ppo import (
    STREAM_MINIBATCH,
    STREAM_SAMPLING,
    PPOConfig,
    PPOState,
    RewardFn,
    Rollout,
    check_sampler_logprobs,
    chunks,
    minibatches,
    my_prompts,
    optimizer_step,
    policy_logprobs,
    rollout,
    rollout_stats,
)
from minicai.seeds import iteration_seed


def group_rollout(policy, ref_model, prompt_ids: list[list[int]], prompts: list[str], reward_fn: RewardFn,
                  cfg: PPOConfig, stop_ids=(), pad_id: int = 0, seed: int = 0,
                  first_pass_rows: int | None = None) -> Rollout:
    """cfg.group_size responses to each prompt: rollout() of the prompts each repeated group_size times in a row
    (row i answers prompt i // group_size), without a value model. Its first forward pass takes the rows of
    grpo_step's first micro-batch (first_pass_rows; default: cfg.micro_batch_size or cfg.minibatch_size), which
    then recomputes their log-probs bit for bit (ratio exactly 1)."""
    G = cfg.group_size
    first = (cfg.micro_batch_size or cfg.minibatch_size) if first_pass_rows is None else first_pass_rows
    return rollout(policy, ref_model, None, [p for p in prompt_ids for _ in range(G)],
                   [p for p in prompts for _ in range(G)], reward_fn, cfg, stop_ids, pad_id, seed,
                   first_pass_rows=first)


def compute_group_advantages(ro: Rollout, beta: float, cfg: PPOConfig) -> Rollout:
    """Fill in KL, rewards and group advantages of a rollout whose rows are G responses per prompt, in groups.

    rewards [B, N] are losses.per_token_rewards' (score, plus the truncation penalty, at the last token; -beta * KL_t
    on every token when cfg.kl_in == "reward", else none and KL_t is the k3 estimate the loss term uses). A row's
    total reward R [B] is their sum; advantages [B, N] = losses.group_advantages(R as [B/G, G]) on the row's tokens.
    A group whose R are all equal carries no signal: its advantages are 0."""
    in_reward = cfg.kl_in == "reward"
    ro.rewards, ro.kl = per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.response_mask,
                                          beta if in_reward else 0.0, cfg.kl_estimator if in_reward else "k3",
                                          truncated=~ro.finished, truncation_penalty=cfg.truncation_penalty)
    total = ro.rewards.sum(1)  # [B] score (+ penalty) - beta * sum_t KL_t (rewards are 0 on padding)
    baseline = "mean" if cfg.advantage == "grpo" else "leave_one_out"
    scale = cfg.group_scale or ("std" if cfg.advantage == "grpo" else "none")
    adv = group_advantages(total.view(-1, cfg.group_size), baseline, scale).reshape(-1)  # [B]
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    ro.advantages = torch.where(ro.response_mask.bool(), adv[:, None], zero)  # [B, N]
    ro.beta = float(beta)
    return ro


def group_token_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, clip: float,
                     kl_coef: float = 0.0) -> Tensor:
    """The per-token loss of GRPO's objective (Shao et al. 2024, eq. 3, before its means over tokens and responses):
    -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + kl_coef * k3(pi || pi_ref), ratio = pi / pi_old.

    The first term is losses.ppo_policy_loss's per token (Schulman et al. 2017, eq. 7); the second is GRPO's KL
    estimate pi_ref/pi - log(pi_ref/pi) - 1 (losses.kl_penalty "k3"), 0 when kl_coef is 0 (KL in the reward).
    All [B, N]; reduce with losses.aggregate_loss (micro_batch_loss)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    if kl_coef:
        loss = loss + kl_coef * kl_penalty(logp, ref_logp, "k3")
    return loss


def micro_batch_loss(per_token: Tensor, mask: Tensor, mode: str, batch_rows: int, batch_tokens: int,
                     max_len: int) -> Tensor:
    """One micro-batch's share of its minibatch's loss in aggregation `mode`: the shares of a minibatch's micro-
    batches add up to losses.aggregate_loss over the whole minibatch, however it is split. per_token/mask [b, N];
    batch_rows and batch_tokens: the minibatch's non-empty rows and real tokens; max_len: the response limit.

      token-mean               sum / batch_tokens: every token of the minibatch weighs the same (PPO here, DAPO).
      seq-mean-token-mean      mean over rows of each row's token mean (GRPO as published): a token of a response
                               of length L weighs 1/L, so with a positive advantage short responses are pushed up
                               harder, and with a negative one long responses are pushed down more gently; the
                               length bias Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783, section 3.1) show makes
                               wrong answers grow longer.
      seq-mean-token-sum       mean over rows of each row's token sum: a response weighs its length.
      seq-mean-token-sum-norm  sum / (batch_rows * max_len), a constant (Dr. GRPO; TRL's dr_grpo): every token weighs
                               the same and the scale depends on neither the lengths nor the split.
      token-sum                sum, no normaliser (verl 0.9): the micro-batches' sums add up as they are."""
    if mode == "token-mean":
        return aggregate_loss(per_token, mask, mode, global_tokens=float(batch_tokens))
    if mode == "token-sum":
        return aggregate_loss(per_token, mask, mode)
    if mode == "seq-mean-token-sum-norm":
        return aggregate_loss(per_token, mask, mode, constant=float(batch_rows * max_len))
    rows = int((mask.sum(1) > 0).sum())
    return aggregate_loss(per_token, mask, mode) * (rows / batch_rows)


def grpo_step(policy, policy_opt, ro: Rollout, cfg: PPOConfig, seed: int = 0, amp_dtype: torch.dtype | None = None,
              scaler: torch.amp.GradScaler | None = None) -> dict:
    """cfg.ppo_epochs passes of minibatch updates of the policy alone on group advantages; returns mean statistics.

    Each minibatch of cfg.minibatch_size rows (ppo.minibatches: the first epoch in order, later epochs shuffled) is
    one optimiser step, its gradient accumulated over micro-batches of cfg.micro_batch_size rows (micro_batch_loss:
    the same loss whatever the split). The first micro-batch is the rollout's first forward pass, so the ratio is
    exactly 1 there (ratio_first_maxdev == 0). With cfg.kl_in == "loss", the k3 term is taken against the rollout's
    reference log-probs (the reference is frozen), with coefficient ro.beta. Statistics are token-weighted means over
    each minibatch (ref_kl_k3: the per-token k3 KL of the policy being updated to the reference), policy_loss the
    minibatch's loss; then means over the minibatches. amp_dtype and scaler: as in ppo_step (the mixed-precision
    rule of precision.py).

    Under torchrun this process holds whole groups (group_iteration), and a global minibatch's rows are split by the
    same rule (distributed.local_rows). Group advantages need nothing from other processes; the loss normalisers
    (rows and tokens of the minibatch) and the statistics are global, and the gradients are summed."""
    B, P = ro.query_ids.shape
    ids, mask = ro.input_ids, ro.attention_mask
    params = [p for p in policy.parameters() if p.requires_grad]
    scaler = scaler or precision.grad_scaler(ids.device, amp_dtype)
    micro = cfg.micro_batch_size or cfg.minibatch_size
    kl_coef = ro.beta if cfg.kl_in == "loss" else 0.0
    sums: dict[str, float] = {}
    steps = 0
    ratio_first_maxdev = float("nan")
    for batch in minibatches(int(distributed.total(B)), cfg.minibatch_size, cfg.ppo_epochs, seed):
        batch = distributed.local_rows(batch, cfg.group_size).to(ids.device)
        batch_mask = ro.response_mask[batch]
        # the global minibatch's non-empty rows and tokens: the normalisers of its loss (micro_batch_loss)
        n_rows = int(distributed.total(int((batch_mask.sum(1) > 0).sum())))
        n_tokens = int(distributed.total(int(batch_mask.sum())))
        steps += 1
        policy_opt.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}  # this process's part of the minibatch's statistics
        for sub in chunks(len(batch), micro):
            rows = batch[sub]
            m = ro.response_mask[rows]
            with precision.autocast(ids.device, amp_dtype):
                logp, logits = policy_logprobs(policy, ids[rows], mask[rows], P, cfg.temperature, ro.prefix_ids)
            per_token = group_token_loss(logp, ro.logprobs[rows], ro.ref_logprobs[rows], ro.advantages[rows],
                                         cfg.clip_ratio, kl_coef)
            loss = micro_batch_loss(per_token, m, cfg.loss_agg, n_rows, n_tokens, cfg.max_new_tokens)
            scaler.scale(loss).backward()
            with torch.no_grad():
                if steps == 1 and sub.start == 0:  # before any update in this iteration: must be exactly 0
                    dev = (torch.exp(logp - ro.logprobs[rows]) - 1).abs()
                    ratio_first_maxdev = float(torch.where(m.bool(), dev, 0.0).max())
                _, token_means = ppo_policy_loss(logp, ro.logprobs[rows], ro.advantages[rows], m, cfg.clip_ratio)
                token_means["ref_kl_k3"] = masked_mean(kl_penalty(logp, ro.ref_logprobs[rows], "k3"), m)
                token_means["entropy"] = entropy_from_logits(logits, m, cfg.temperature)
            del logits
            share = float(m.sum()) / n_tokens  # this micro-batch's part of a token mean over the minibatch
            shares = [(k, float(v) * share) for k, v in token_means.items()]
            for k, v in [("policy_loss", float(loss.detach()))] + shares:
                step_sums[k] = step_sums.get(k, 0.0) + v
        norm = optimizer_step(policy_opt, params, scaler, cfg.max_grad_norm, "grpo", steps,
                              step_sums.get("policy_loss"))  # None: none of this minibatch's rows are here
        if step_sums:  # the norm is the same in every process: weighted by their token shares, it adds up to itself
            step_sums["policy_grad_norm"] = float(norm) * (float(batch_mask.sum()) / n_tokens)
        for k, v in step_sums.items():
            sums[k] = sums.get(k, 0.0) + v
    stats = {k: v / steps for k, v in distributed.sum_stats(sums).items()}
    stats["ratio_first_maxdev"] = distributed.largest(ratio_first_maxdev)  # nan: none of its rows here
    return stats


def group_stats(ro: Rollout, cfg: PPOConfig) -> dict:
    """What to log about a batch of groups, beyond rollout_stats (under torchrun: over every process's groups)."""
    total = (ro.rewards * ro.response_mask).sum(1).view(-1, cfg.group_size)  # [B/G, G]
    adv = ro.advantages[:, 0]  # [B]: each row's advantage (every response has a first token)
    return {
        "reward_group_std": distributed.mean(total.std(dim=1)),  # mean within-group spread of R
        "groups_without_signal": distributed.mean((total == total[:, :1]).all(dim=1).float()),  # all R equal: A = 0
        "advantage_abs_mean": distributed.mean(adv.abs()),
    }


def group_iteration(state: PPOState, prompt_ids: list[list[int]], prompts: list[str], reward_fn: RewardFn,
                    cfg: PPOConfig, stop_ids=(), pad_id: int = 0, seed: int = 0) -> tuple[Rollout, dict]:
    """GRPO / RLOO: cfg.group_size responses to each of the batch_size / group_size prompts -> group advantages ->
    grpo_step -> KL controller update; advances state.iteration by one. The rollout's rows are the prompts, each
    repeated group_size times in a row (row i answers prompts[i // group_size]).

    prompt_ids/prompts: the global batch. Under torchrun each process takes whole groups: its prompts (ppo.my_prompts)
    with all their responses, so the group advantages are computed where the groups are; it returns its own Rollout,
    and the statistics are global."""
    G = cfg.group_size
    if cfg.advantage == "gae" or len(prompt_ids) * G != cfg.batch_size or len(prompts) != len(prompt_ids):
        raise ValueError(f"group_iteration needs advantage grpo/rloo and batch_size / group_size = "
                         f"{cfg.batch_size // G} prompts, got advantage {cfg.advantage!r} and {len(prompt_ids)}")
    it = state.iteration
    t0 = time.perf_counter()
    prompt_ids, prompts, first = my_prompts(prompt_ids, prompts, cfg.minibatch_size, G)
    first = min(cfg.micro_batch_size or cfg.minibatch_size, first)  # this process's first micro-batch
    sample_seed = iteration_seed(seed + 7919 * distributed.rank(), it, STREAM_SAMPLING)
    with precision.autocast(state.policy.device, state.amp_dtype):  # sampling and the forward passes alike
        ro = group_rollout(state.policy, state.ref_model, prompt_ids, prompts, reward_fn, cfg, stop_ids, pad_id,
                           seed=sample_seed, first_pass_rows=first)
    check_sampler_logprobs(ro, state.amp_dtype or state.policy.dtype, cfg.logprob_tol)
    compute_group_advantages(ro, state.kl_ctl.beta, cfg)
    stats = {"iteration": it, **rollout_stats(ro), **group_stats(ro, cfg)}
    t1 = time.perf_counter()
    stats.update(grpo_step(state.policy, state.policy_opt, ro, cfg, seed=iteration_seed(seed, it, STREAM_MINIBATCH),
                           amp_dtype=state.amp_dtype, scaler=state.scalers[0] if state.scalers else None))
    state.kl_ctl.update(stats["kl"], n_steps=cfg.batch_size)
    stats["beta_next"] = state.kl_ctl.beta
    stats["rollout_s"] = t1 - t0
    stats["update_s"] = time.perf_counter() - t1
    state.iteration = it + 1
    return ro, stats
