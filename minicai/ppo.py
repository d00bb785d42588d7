"""RL-CAI (Bai et al. 2022, section 4): PPO on the preference model's score with a per-token KL penalty.

One PPO iteration, as in Ziegler et al. 2019 (arXiv 1909.08593) and lm-human-preferences:

1. rollout   sample a response for each prompt from the policy (left-padded prompts, KV cache), then run one
             forward pass over prompt + response through the policy (the "old" log-probs), the frozen reference
             (the SL-CAI model) and the value model, and score each response with the preference model.
2. advantages  r_t = -beta * KL_t on every response token, plus the PM score on the last one (losses.per_token_rewards);
             GAE over the value model's estimates (losses.gae); advantages whitened over the batch.
3. ppo_step  a few epochs of minibatch updates: the clipped surrogate for the policy (losses.ppo_policy_loss), the
             clipped value loss for the value model (losses.ppo_value_loss), each with its own AdamW and its own
             gradient-norm clip. Then the KL controller adapts beta from the batch's KL.

Layout of every forward pass: `prefix | pad.. prompt | response ..pad`. The prefix [L] is the opening all rendered
prompts share (chat template, system message); it is computed once per forward pass, and every row attends to it
(fast.FlatRows on the CPU; PPOConfig.share_prefix=False gives L = 0). Then come the rest of the prompts, left-padded
[B, P], and the right-padded responses [B, N]; the model takes positions from the mask, so padding changes
nothing. The hidden state at column P-1+t predicts response token t and is also where the value V(s_t) is read.

Correctness checks that run every iteration (and are logged):
- the old log-probs are recomputed with a forward pass; the sampler's own log-probs must agree (float32: within
  `logprob_tol`), which proves the padding and positions of the two code paths agree;
- the rollout's first forward pass takes exactly the rows of the first PPO minibatch, so before the first update
  the ratio is exactly 1 (`ratio_first_maxdev` == 0); policy and reference take the same passes, so at iteration
  0, where policy == reference, KL is exactly 0.

GRPO / RLOO (PPOConfig.advantage "grpo" / "rloo") replace the value model by group advantages: minicai/grpo.py,
which takes the rollout, the forward passes and the checkpoints from here.

Randomness: every random choice (prompt order, sampling, minibatch order) is drawn from a generator seeded with
(seed, iteration, stream), so a run resumed from a checkpoint repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from minicai import MinicaiError, distributed, precision
from minicai.losses import (
    AGG_MODES,
    GROUP_SCALES,
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)
from minicai.model import shared_prefix_length
from minicai.run import check_finite
from minicai.sampling import generate, pad_rows, response_ids
from minicai.seeds import iteration_seed

# reward_fn(prompts, responses) -> scores [B]: prompts are the user turns as text, responses the generated token ids
# of each row without its stop token. The PM's score (score_with_pm) or, in tests, a programmatic reward.
RewardFn = Callable[[list[str], list[list[int]]], Tensor]


@dataclass
class PPOConfig:
    """Hyperparameters of one RL-CAI run (defaults: CPU-sized, see train_rl.py --help)."""

    batch_size: int = 8  # episodes (prompts) per iteration
    max_new_tokens: int = 32  # response length limit; a response that hits it has no stop token ("truncated")
    temperature: float = 1.0  # sampling temperature; log-probs of policy and reference use the same one
    ppo_epochs: int = 2  # passes over each batch of rollouts
    minibatch_size: int = 4  # rows per gradient step
    forward_batch_size: int = 16  # rows per no-grad forward pass in the rollout (policy, reference, value model)
    policy_lr: float = 3e-5  # 1e-5 moved the 135M policy too little to see within 12 iterations of batch 8
    value_lr: float = 3e-5
    weight_decay: float = 0.0
    clip_ratio: float = 0.2  # PPO epsilon (Schulman et al. 2017, eq. 7)
    clip_value: float = 0.2  # value-function clip range around the rollout's values
    max_grad_norm: float = 1.0  # per network (policy, value)
    gamma: float = 1.0  # discount over response tokens
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    kl_coef: float = 0.05  # initial beta in r_t = -beta * KL_t
    kl_target: float | None = 6.0  # target KL (nats per response) of the adaptive controller; None: fixed beta
    kl_horizon: float | None = None  # episodes; None: KL_HORIZON_BATCHES batches (Ziegler: 10000 at batch 512)
    kl_estimator: str = "k1"  # losses.kl_penalty kind: k1 (log-ratio, Ziegler et al.), abs, k2, k3
    truncation_penalty: float = 0.0  # added to the score of responses without a stop token (e.g. -1); 0 = off
    logprob_tol: float = 1e-3  # max |sampler log-prob - forward log-prob| allowed in float32 (bf16: see precision)
    share_prefix: bool = True  # run the prompts' common opening once per forward pass (exact up to float rounding)
    # Critic-free group advantages (GRPO / RLOO, minicai/grpo.py). With advantage != "gae", batch_size
    # counts responses: batch_size / group_size prompts, group_size samples each; there is no value model.
    advantage: str = "gae"  # gae: PPO with a value model | grpo (Shao et al. 2024) | rloo (Ahmadian et al. 2024)
    group_size: int = 4  # G responses per prompt (grpo, rloo)
    group_scale: str | None = None  # losses.group_advantages scale; None: "std" for grpo, "none" for rloo
    kl_in: str = "reward"  # reward: -beta * KL_t in the reward (paper, PPO) | loss: beta * k3 term in the loss (GRPO)
    loss_agg: str = "token-mean"  # losses.aggregate_loss mode of the group update (grpo_step: length bias)
    micro_batch_size: int | None = None  # rows per forward/backward pass of the group update; None: minibatch_size

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size} (need >= 2 to whiten advantages)")
        if self.minibatch_size < 1 or self.minibatch_size > self.batch_size:
            problems.append(f"minibatch_size={self.minibatch_size} (need 1..batch_size={self.batch_size})")
        if self.forward_batch_size < 1:
            problems.append(f"forward_batch_size={self.forward_batch_size} (need >= 1)")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} (need > 0: PPO needs a sampling distribution)")
        if self.max_new_tokens < 1 or self.ppo_epochs < 1:
            problems.append("max_new_tokens and ppo_epochs must be >= 1")
        if self.truncation_penalty > 0:
            problems.append(f"truncation_penalty={self.truncation_penalty} (it is added to the score: need <= 0)")
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_horizon is not None and self.kl_horizon <= 0):
            problems.append(f"kl_target={self.kl_target}, kl_horizon={self.kl_horizon} (need > 0)")
        problems += group_config_problems(self)
        if problems:
            raise MinicaiError("invalid PPO settings: " + "; ".join(problems) + ". Fix the corresponding flags.")


ADVANTAGES = ("gae", "grpo", "rloo")
KL_PLACES = ("reward", "loss")


def group_config_problems(cfg: PPOConfig) -> list[str]:
    """What is wrong with the group-advantage settings of cfg (PPOConfig.__post_init__ reports it)."""
    if cfg.advantage not in ADVANTAGES:
        return [f"advantage={cfg.advantage!r} (use one of {', '.join(ADVANTAGES)})"]
    if cfg.advantage == "gae":
        return []
    problems = []
    if cfg.group_size < 2 or cfg.batch_size % cfg.group_size:
        problems.append(f"group_size={cfg.group_size} with batch_size={cfg.batch_size} (need group_size >= 2 "
                        "dividing batch_size: batch_size counts responses, group_size per prompt)")
    if cfg.kl_in not in KL_PLACES:
        problems.append(f"kl_in={cfg.kl_in!r} (use reward or loss)")
    if cfg.loss_agg not in AGG_MODES:
        problems.append(f"loss_agg={cfg.loss_agg!r} (use one of {', '.join(AGG_MODES)})")
    if cfg.group_scale is not None and cfg.group_scale not in GROUP_SCALES:
        problems.append(f"group_scale={cfg.group_scale!r} (use one of {', '.join(GROUP_SCALES)})")
    if cfg.micro_batch_size is not None and not 1 <= cfg.micro_batch_size <= cfg.minibatch_size:
        problems.append(f"micro_batch_size={cfg.micro_batch_size} (need 1..minibatch_size={cfg.minibatch_size})")
    return problems


# The adaptive controller's default horizon, in batches: beta closes at most 20% of its gap per 20 iterations whatever
# the batch size (Ziegler et al. 2019: a horizon of 10000 episodes at batch 512, about 20 batches). A horizon fixed in
# episodes would move beta 8 times faster per iteration at batch 64 than at batch 8.
KL_HORIZON_BATCHES = 20


def kl_horizon(cfg: PPOConfig) -> float:
    """The controller's horizon in episodes: cfg.kl_horizon, or KL_HORIZON_BATCHES * batch_size when it is None."""
    return float(cfg.kl_horizon) if cfg.kl_horizon is not None else float(KL_HORIZON_BATCHES * cfg.batch_size)


def make_kl_controller(cfg: PPOConfig) -> AdaptiveKLController | FixedKLController:
    """Adaptive (Ziegler et al. 2019) when a target KL is set, else a fixed beta."""
    if cfg.kl_target is None:
        return FixedKLController(cfg.kl_coef)
    return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, kl_horizon(cfg))


STREAM_PROMPTS, STREAM_SAMPLING, STREAM_MINIBATCH, STREAM_MIX = 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def epoch_indices(n: int, count: int, iteration: int, seed: int, stream: int) -> list[int]:
    """Indices of the `count` items that iteration `iteration` takes from a list of n, walking through a fresh random
    permutation of the list each epoch. A pure function of its arguments (so resuming needs no sampler state)."""
    if n < 1:
        raise ValueError("epoch_indices needs a non-empty list")
    out = []
    perm, perm_epoch = None, -1
    for k in range(iteration * count, (iteration + 1) * count):
        epoch = k // n
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(iteration_seed(seed, epoch, stream))
            perm, perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        out.append(perm[k % n])
    return out


def mixed_prompt_batch(
    red_team: list, helpful: list, batch_size: int, red_team_fraction: float, iteration: int, seed: int
) -> list[tuple[str, object]]:
    """This iteration's prompts: round(fraction * batch) red-team prompts and the rest helpfulness prompts (the paper's
    RL-CAI mixes both, section 4.1), shuffled together. Returns [("red_team" | "helpful", item), ...]."""
    if not red_team and not helpful:
        raise MinicaiError("no prompts: both the red-team and the helpfulness prompt lists are empty")
    n_red = batch_size if not helpful else 0 if not red_team else round(red_team_fraction * batch_size)
    batch = []
    if n_red:
        batch += [("red_team", red_team[i]) for i in epoch_indices(len(red_team), n_red, iteration, seed, 10)]
    n_help = batch_size - n_red
    if n_help:
        batch += [("helpful", helpful[i]) for i in epoch_indices(len(helpful), n_help, iteration, seed, 11)]
    g = torch.Generator().manual_seed(iteration_seed(seed, iteration, STREAM_MIX))
    return [batch[i] for i in torch.randperm(len(batch), generator=g).tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# Forward passes over [prompt | response]


def policy_logprobs(model, ids: Tensor, mask: Tensor, prompt_width: int, temperature: float,
                    prefix_ids=None) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens under `model` and the logits that produced them.

    ids/mask [B, P + N] (left-padded prompt block of width P, then the response block), optionally preceded in
    every row by the shared prompt prefix `prefix_ids` [L] (computed once for all rows, fast.FlatRows). The last
    response token predicts nothing, so the forward pass stops before it; only the hidden states at columns
    P-1 .. P+N-2 (those that predict the response) go through the LM head.
    Returns logp [B, N] (float32, tempered as the sampler was) and logits [B, N, V]."""
    hidden = model.hidden_states(ids[:, :-1], mask[:, :-1], prefix=prefix_ids)[:, prompt_width - 1 :]
    logits = model.logits(hidden)  # [B, N, V]: column t predicts response token t
    return token_logprobs(logits, ids[:, prompt_width:], temperature), logits


def response_values(value_model, ids: Tensor, mask: Tensor, prompt_width: int, prefix_ids=None) -> Tensor:
    """V(s_t) for each response token t, read at column P-1+t (the state before token t): [B, P+N] -> [B, N] float32."""
    return value_model.values(ids[:, :-1], mask[:, :-1], prefix=prefix_ids)[:, prompt_width - 1 :].float()


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` of range(n): the passes over a batch."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------------------------------------
# Rollout


@dataclass
class Rollout:
    """One batch of episodes and everything PPO needs about them. B rows, prompt width P, response width N."""

    prompts: list[str]  # the user turns (what the PM sees as the human's message)
    prefix_ids: Tensor  # [L] the opening every rendered prompt shares (empty when share_prefix is off)
    query_ids: Tensor  # [B, P] the rendered prompts after that prefix, left-padded
    query_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, N] sampled tokens (stop token included), right-padded
    response_mask: Tensor  # [B, N] 1 on real response tokens
    finished: Tensor  # [B] bool: the response ended with a stop token
    responses: list[list[int]]  # each row's response tokens without the stop token (what the PM scores)
    sample_logprobs: Tensor  # [B, N] the sampler's log-probs (cross-check only)
    logprobs: Tensor  # [B, N] "old" log-probs: forward pass of the policy before the update
    ref_logprobs: Tensor  # [B, N] frozen reference (SL-CAI) log-probs
    values: Tensor | None  # [B, N] value model's V(s_t) before the update (None without a value model)
    scores: Tensor  # [B] reward_fn's score (the PM's)
    beta: float = float("nan")  # KL coefficient used for the rewards below
    kl: Tensor | None = None  # [B, N] per-token KL estimate (0 on padding)
    rewards: Tensor | None = None  # [B, N] -beta * KL_t, plus the score at the last token
    advantages: Tensor | None = None  # [B, N] GAE, whitened (group advantages: each row's, on its tokens)
    returns: Tensor | None = None  # [B, N] value targets (GAE + V, unwhitened)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # [B, P+N] (after prefix_ids)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # [B, P+N]


@torch.no_grad()
def rollout(
    policy,
    ref_model,
    value_model,
    prompt_ids: list[list[int]],
    prompts: list[str],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    stop_ids=(),
    pad_id: int = 0,
    seed: int = 0,
    first_pass_rows: int | None = None,
) -> Rollout:
    """Sample one response per prompt and gather old/reference log-probs, values and scores (experience collection).

    prompt_ids: the rendered prompts (chat template + generation prompt), one token list per row. value_model None
    (GRPO, RLOO): no values (Rollout.values is None).
    first_pass_rows: how many leading rows form the first PPO minibatch (default: cfg.minibatch_size; under
    torchrun, this process's share of it, which may be 0)."""
    gen = generate(policy, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=stop_ids,
                   pad_id=pad_id, seed=seed, share_prefix=cfg.share_prefix)
    L = shared_prefix_length(prompt_ids) if cfg.share_prefix else 0
    prefix_ids = torch.tensor(prompt_ids[0][:L], dtype=torch.long, device=policy.device)
    query_ids, query_mask = pad_rows([p[L:] for p in prompt_ids], pad_id, "left", policy.device)
    P = query_ids.shape[1]
    ids = torch.cat([query_ids, gen.tokens], dim=1)  # [B, P+N], each row preceded by prefix_ids
    mask = torch.cat([query_mask, gen.mask], dim=1)
    B = len(prompt_ids)
    # Passes of forward_batch_size rows (larger matrix products are faster), except that the rows of the first PPO
    # minibatch go alone: ppo_step's first minibatch (the same rows, tensors and prefix) then recomputes their
    # log-probs bit for bit (ratio exactly 1). Policy and reference take the same passes, so a reference equal to
    # the policy gives a KL of exactly 0.
    first = min(cfg.minibatch_size if first_pass_rows is None else first_pass_rows, B)
    rest = chunks(B - first, cfg.forward_batch_size)
    passes = ([slice(0, first)] if first else []) + [slice(first + c.start, first + c.stop) for c in rest]
    logp, ref_logp, values = [], [], []
    for rows in passes:
        logp.append(policy_logprobs(policy, ids[rows], mask[rows], P, cfg.temperature, prefix_ids)[0])
        ref_logp.append(policy_logprobs(ref_model, ids[rows], mask[rows], P, cfg.temperature, prefix_ids)[0])
        if value_model is not None:
            values.append(response_values(value_model, ids[rows], mask[rows], P, prefix_ids))
    responses = [response_ids(gen, i, stop_ids) for i in range(B)]
    scores = torch.as_tensor(reward_fn(prompts, responses), dtype=torch.float32).to(policy.device)
    if scores.shape != (len(prompt_ids),):
        raise ValueError(f"reward_fn returned shape {tuple(scores.shape)}, want [{len(prompt_ids)}]")
    keep = gen.mask.bool()

    def zero(t: Tensor) -> Tensor:  # float32 at least (float64 models stay float64); exact zeros on padding
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return Rollout(
        prompts=list(prompts), prefix_ids=prefix_ids, query_ids=query_ids, query_mask=query_mask,
        response_ids=gen.tokens, response_mask=gen.mask, finished=gen.finished, responses=responses,
        sample_logprobs=zero(gen.logprobs),
        logprobs=zero(torch.cat(logp)), ref_logprobs=zero(torch.cat(ref_logp)),
        values=zero(torch.cat(values)) if values else None,
        scores=scores,
    )


def compute_advantages(ro: Rollout, beta: float, cfg: PPOConfig) -> Rollout:
    """Fill in KL, per-token rewards, GAE advantages and returns (section 4: reward = PM score - beta * KL)."""
    mask = ro.response_mask
    truncated = ~ro.finished
    ro.rewards, ro.kl = per_token_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, mask, beta, cfg.kl_estimator,
                                          truncated=truncated, truncation_penalty=cfg.truncation_penalty)
    adv, ro.returns = gae(ro.rewards, ro.values, mask, cfg.gamma, cfg.lam)
    # under torchrun: the mean and variance of every process's advantages (distributed.whiten), not this one's
    ro.advantages = distributed.whiten(adv, mask) if cfg.whiten_advantages else adv
    ro.beta = float(beta)
    return ro


def score_with_pm(rm, rm_tokenizer, policy_tokenizer, prompts: list[str], responses: list[list[int]],
                  batch_size: int = 8) -> Tensor:
    """The PM's score of each (prompt, response): the response goes to the PM as text, so the PM may use another
    tokenizer than the policy. Use as a reward_fn via functools.partial(score_with_pm, rm, rm_tok, policy_tok)."""
    from minicai.reward import score_conversations

    texts = [policy_tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    with torch.no_grad():
        return score_conversations(rm, rm_tokenizer, prompts, texts, batch_size=batch_size).float().cpu()


def same_tokenizer(a, b) -> bool:
    """True when two ChatTokenizers encode and render identically (same tokenizer.json content and chat format)."""
    return a.tokenizer.to_str() == b.tokenizer.to_str() and a.format == b.format


def make_value_model(policy, policy_tokenizer, pm, pm_tokenizer) -> tuple[torch.nn.Module, str]:
    """The value model V(s_t), a RewardModel whose head is read at every position (a separate network).

    It starts as a copy of the preference model, head included, when the PM reads the policy's tokens (same
    tokenizer), as in Stiennon et al. 2020 (arXiv 2009.01325) and TRL's PPO, which loads its value model from the
    reward model: the PM already judges responses, so its head is a good first guess of the return.
    (lm-human-preferences differs: its value is a second scalar head on the policy network itself, policy.py
    `scalar_heads=['value']`.) Otherwise the PM cannot read the policy's token ids, and the value model starts from
    a copy of the policy's trunk with a zero head (initial values 0). Returns (value model, where it came from)."""
    from minicai.reward import RewardModel

    if pm is not None and pm_tokenizer is not None and same_tokenizer(policy_tokenizer, pm_tokenizer):
        return copy.deepcopy(pm), "copy of the preference model (same tokenizer as the policy)"
    return (RewardModel.from_lm(copy.deepcopy(policy), head_init="zero"),
            "policy trunk + zero head (the preference model uses another tokenizer)")


# ---------------------------------------------------------------------------------------------------------------------
# PPO update


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.

    The result equals torch.nn.utils.clip_grad_norm_'s (same norm, same coefficient max_norm / (norm + 1e-6)); it only
    skips the multiplication by 1 that torch does when no clipping is needed (torch avoids the branch to spare GPUs a
    synchronisation; on the CPU the pass over 135M gradients costs more than the branch)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm / (norm + 1e-6) < 1:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], scaler, max_norm: float,
                   phase: str, step: int, loss) -> Tensor:
    """Apply the gradients that the backward passes left in `params`: sum them over processes (torchrun), unscale
    them (fp16), clip their norm to max_norm, stop on a NaN/inf loss or norm before the update (run.check_finite),
    step, and free them. Returns the norm before clipping."""
    distributed.all_reduce_grads(params)
    scaler.unscale_(opt)
    norm = clip_grad_norm(params, max_norm)
    check_finite(phase, step, loss=loss, grad_norm=None if scaler.is_enabled() else norm)  # fp16: the scaler's job
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm


def minibatches(n: int, size: int, epochs: int, seed: int):
    """The rows [size] of each minibatch of `epochs` passes over n rows. The first pass takes the rows in order: its
    first minibatch holds the rows of the rollout's first forward pass, which it then recomputes bit for bit (ratio
    exactly 1); later passes shuffle, with a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=g)
        for chunk in chunks(n, size):
            yield order[chunk]


def ppo_step(policy, value_model, policy_opt, value_opt, ro: Rollout, cfg: PPOConfig, seed: int = 0,
             amp_dtype: torch.dtype | None = None, scalers: tuple | None = None) -> dict:
    """cfg.ppo_epochs passes of minibatch updates over the rollout (minibatches); returns mean statistics.

    amp_dtype: the forward passes run under precision.autocast in this dtype (bf16/fp16; None: none), as the
    rollout's did, so the first minibatch still recomputes the old log-probs bit for bit. scalers: (policy, value)
    precision.grad_scaler objects (fp16 loss scaling; default: made here, disabled unless amp_dtype is fp16).
    Policy and value model are separate networks with separate AdamW optimisers and separate gradient-norm clips, so
    the two losses need no weighting against each other.

    Under torchrun this process holds rows r, r + W, ... of the global batch: each global minibatch is split by that
    rule (distributed.local_rows), each loss is a token mean over the GLOBAL minibatch (distributed.token_share) and
    the gradients are summed (optimizer_step); the statistics are token means over the global minibatches."""
    B, P = ro.query_ids.shape
    ids, mask = ro.input_ids, ro.attention_mask
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params = [p for p in value_model.parameters() if p.requires_grad]
    if scalers is None:
        scalers = (precision.grad_scaler(ids.device, amp_dtype), precision.grad_scaler(ids.device, amp_dtype))
    policy_scaler, value_scaler = scalers
    sums: dict[str, float] = {}  # each minibatch's statistics, times this process's token share
    steps = 0
    ratio_first_maxdev = float("nan")
    for rows in minibatches(int(distributed.total(B)), cfg.minibatch_size, cfg.ppo_epochs, seed):
        rows = distributed.local_rows(rows).to(ids.device)
        m = ro.response_mask[rows]
        share = distributed.token_share(m)
        steps += 1
        if len(rows) == 0:  # none of this minibatch's rows are here: add zero gradients to the other processes' sums
            optimizer_step(policy_opt, policy_params, policy_scaler, cfg.max_grad_norm, "ppo", steps, None)
            optimizer_step(value_opt, value_params, value_scaler, cfg.max_grad_norm, "ppo value", steps, None)
            continue
        # policy: clipped surrogate on whitened advantages
        with precision.autocast(ids.device, amp_dtype):
            logp, logits = policy_logprobs(policy, ids[rows], mask[rows], P, cfg.temperature, ro.prefix_ids)
        pg_loss, pg_stats = ppo_policy_loss(logp, ro.logprobs[rows], ro.advantages[rows], m, cfg.clip_ratio)
        if steps == 1:  # before any update in this iteration: must be exactly 0
            dev = (torch.exp(logp.detach() - ro.logprobs[rows]) - 1).abs()
            ratio_first_maxdev = float(torch.where(m.bool(), dev, 0.0).max())
        policy_opt.zero_grad(set_to_none=True)
        policy_scaler.scale(pg_loss * share).backward()
        pg_norm = optimizer_step(policy_opt, policy_params, policy_scaler, cfg.max_grad_norm, "ppo", steps, pg_loss)
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), m, cfg.temperature)
        del logits
        # value model: clipped regression onto the GAE returns
        with precision.autocast(ids.device, amp_dtype):
            v = response_values(value_model, ids[rows], mask[rows], P, ro.prefix_ids)
        vf_loss, vf_stats = ppo_value_loss(v, ro.values[rows], ro.returns[rows], m, cfg.clip_value)
        value_opt.zero_grad(set_to_none=True)
        value_scaler.scale(vf_loss * share).backward()
        vf_norm = optimizer_step(value_opt, value_params, value_scaler, cfg.max_grad_norm, "ppo value", steps, vf_loss)
        step_stats = {
            "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "clipfrac": pg_stats["clipfrac"],
            "approx_kl": pg_stats["approx_kl"], "ratio_mean": pg_stats["ratio_mean"],
            "value_clipfrac": vf_stats["vf_clipfrac"], "entropy": entropy,
            "policy_grad_norm": pg_norm, "value_grad_norm": vf_norm,  # the same everywhere: their shares add up to them
        }
        for k, v_ in step_stats.items():
            sums[k] = sums.get(k, 0.0) + float(v_) * share
    stats = {k: v / steps for k, v in distributed.sum_stats(sums).items()}
    stats["ratio_first_maxdev"] = distributed.largest(ratio_first_maxdev)  # nan: none of its rows here
    return stats


def rollout_stats(ro: Rollout) -> dict:
    """What to log about a batch of episodes (after compute_advantages): under torchrun, means, maxima and token
    means over every process's rows (distributed.mean, largest, masked_mean)."""
    m = ro.response_mask.float()
    kl_sum = (ro.kl * m).sum(1)  # [B] KL per response (nats)
    return {
        "score": distributed.mean(ro.scores),
        "score_std": distributed.std(ro.scores),
        "kl": distributed.mean(kl_sum),  # the controller's input: mean over responses of the summed per-token KL
        "kl_per_token": distributed.masked_mean(ro.kl, m),
        "kl_max_abs": distributed.largest(float(((ro.logprobs - ro.ref_logprobs).abs() * m).max())),  # 0: pi = ref
        "beta": ro.beta,
        "reward": distributed.mean((ro.rewards * m).sum(1)),  # total per-episode reward: score - beta * KL (+ penalty)
        "response_length": distributed.mean(m.sum(1)),
        "no_stop_frac": distributed.mean((~ro.finished).float()),
        "sampler_logprob_maxdiff": distributed.largest(float(((ro.sample_logprobs - ro.logprobs).abs() * m).max())),
        **({"value_mean": distributed.masked_mean(ro.values, m), "return_mean": distributed.masked_mean(ro.returns, m)}
           if ro.values is not None else {}),
    }


def check_sampler_logprobs(ro: Rollout, dtype: torch.dtype, tol: float) -> None:
    """The sampler (KV cache, one token at a time) and the full forward pass must give the same log-probs up to the
    rounding of the products' dtype `dtype` (float32: within `tol`; bf16/fp16: precision.logprob_tolerance). A
    larger gap means padding/positions differ between the two paths: a bug, not a user error."""
    tol = precision.logprob_tolerance(dtype, tol)
    gap = float(((ro.sample_logprobs - ro.logprobs).abs() * ro.response_mask).max())
    if not gap <= tol:
        raise RuntimeError(f"sampler log-probs differ from the forward pass by {gap:.2e} > {tol:g} ({dtype}): padding "
                           f"or position handling disagrees between minicai.sampling.generate and the model forward")


# ---------------------------------------------------------------------------------------------------------------------
# One iteration and the training state


@dataclass
class PPOState:
    """Everything that changes during RL training (what a checkpoint stores), plus the frozen reference."""

    policy: torch.nn.Module
    ref_model: torch.nn.Module
    value_model: torch.nn.Module | None  # None for GRPO / RLOO
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer | None
    kl_ctl: AdaptiveKLController | FixedKLController
    iteration: int = 0
    amp_dtype: torch.dtype | None = None  # bf16/fp16: every forward pass runs under autocast (precision.py)
    scalers: tuple | None = None  # (policy, value) fp16 loss scalers (precision.grad_scaler; disabled otherwise)


def init_state(policy, ref_model, value_model, cfg: PPOConfig, amp_dtype: torch.dtype | None = None) -> PPOState:
    """Freeze the reference, make policy and value model trainable, create one AdamW for each (value_model None:
    GRPO / RLOO, no value model and no value optimiser).

    The mixed-precision rule (precision.py): policy and value model hold float32 (or float64) weights, which AdamW
    updates; amp_dtype (bf16/fp16, or None) is the dtype the forward passes run in under autocast. For a KL of
    exactly 0 at iteration 0, give the reference the policy's dtype (a copy of it)."""
    ref_model.requires_grad_(False).eval()
    policy.requires_grad_(True)
    precision.check_trainable(policy, "the policy")
    # fused: one kernel per parameter group instead of foreach's temporary copies of every tensor (faster on CPU and
    # GPU, and the peak memory of a step no longer holds an extra copy of the parameters)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=cfg.policy_lr, weight_decay=cfg.weight_decay, fused=True)
    value_opt = None
    if value_model is not None:
        value_model.requires_grad_(True)
        precision.check_trainable(value_model, "the value model")
        value_opt = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, weight_decay=cfg.weight_decay,
                                      fused=True)
    amp = precision.amp_dtype(amp_dtype) if amp_dtype is not None else None
    scalers = (precision.grad_scaler(policy.device, amp), precision.grad_scaler(policy.device, amp))
    return PPOState(policy, ref_model, value_model, policy_opt, value_opt, make_kl_controller(cfg), amp_dtype=amp,
                    scalers=scalers)


def my_prompts(prompt_ids: list[list[int]], prompts: list[str], first_minibatch: int,
               group: int = 1) -> tuple[list[list[int]], list[str], int]:
    """This process's prompts of a global batch (under torchrun: prompts r, r + W, ... of rank r; all of them in one
    process), and how many of its rollout rows (group per prompt) the first minibatch of `first_minibatch` global
    rows holds: the rollout runs those in a forward pass of their own (ratio exactly 1 in the first update)."""
    n, W = len(prompt_ids), distributed.world()
    if W > n:
        raise MinicaiError(f"a batch of {n} prompts cannot be shared by {W} processes. Fix: raise --batch-size to at "
                           "least the number of processes (torchrun --nproc_per_node)"
                           + (" times --group-size" if group > 1 else ""))
    mine = distributed.my_rows(n)
    first = len(distributed.local_rows(torch.arange(min(first_minibatch, n * group)), group))
    return [prompt_ids[i] for i in mine], [prompts[i] for i in mine], first


def ppo_iteration(state: PPOState, prompt_ids: list[list[int]], prompts: list[str], reward_fn: RewardFn,
                  cfg: PPOConfig, stop_ids=(), pad_id: int = 0, seed: int = 0) -> tuple[Rollout, dict]:
    """rollout -> rewards/advantages -> PPO epochs -> KL controller update; advances state.iteration by one.

    prompt_ids/prompts: the global batch. Under torchrun each process runs its rows (my_prompts) and returns its own
    Rollout; the statistics are global."""
    it = state.iteration
    t0 = time.perf_counter()
    n_all = len(prompt_ids)
    prompt_ids, prompts, first = my_prompts(prompt_ids, prompts, cfg.minibatch_size)
    sample_seed = iteration_seed(seed + 7919 * distributed.rank(), it, STREAM_SAMPLING)
    with precision.autocast(state.policy.device, state.amp_dtype):  # sampling and the forward passes alike
        ro = rollout(state.policy, state.ref_model, state.value_model, prompt_ids, prompts, reward_fn, cfg, stop_ids,
                     pad_id, seed=sample_seed, first_pass_rows=first)
    check_sampler_logprobs(ro, state.amp_dtype or state.policy.dtype, cfg.logprob_tol)
    compute_advantages(ro, state.kl_ctl.beta, cfg)
    stats = {"iteration": it, **rollout_stats(ro)}
    t1 = time.perf_counter()
    stats.update(ppo_step(state.policy, state.value_model, state.policy_opt, state.value_opt, ro, cfg,
                          seed=iteration_seed(seed, it, STREAM_MINIBATCH), amp_dtype=state.amp_dtype,
                          scalers=state.scalers))
    state.kl_ctl.update(stats["kl"], n_steps=n_all)  # the global mean KL over the global batch
    stats["beta_next"] = state.kl_ctl.beta
    stats["rollout_s"] = t1 - t0
    stats["update_s"] = time.perf_counter() - t1
    state.iteration = it + 1
    return ro, stats


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: <dir>/iter_000010/{policy/, value/, trainer_state.pt}


def save_checkpoint(directory, state: PPOState, tokenizer=None, keep: int = 1) -> Path:
    """Write policy (HF layout, with the tokenizer if given), value model, optimiser states, beta and iteration
    counter into directory/iter_NNNNNN, atomically (data.publish_dir); keeps the newest `keep`."""
    from minicai.data import publish_dir  # imported here: this function is the only part of ppo.py this change edits

    directory = Path(directory)

    def write(tmp: Path) -> None:
        state.policy.save_pretrained(tmp / "policy")
        if tokenizer is not None:
            tokenizer.save(tmp / "policy")
        if state.value_model is not None:
            state.value_model.save_pretrained(tmp / "value")
        scalers = [s.state_dict() for s in state.scalers] if state.scalers and state.scalers[0].is_enabled() else None
        torch.save({"iteration": state.iteration, "beta": state.kl_ctl.beta,
                    "policy_opt": state.policy_opt.state_dict(),
                    "value_opt": state.value_opt.state_dict() if state.value_opt is not None else None,
                    "scalers": scalers}, tmp / "trainer_state.pt")

    final = publish_dir(directory / f"iter_{state.iteration:06d}", write)
    for old in sorted(directory.glob("iter_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint folder in `directory`, or None."""
    directory = Path(directory)
    done = [p for p in directory.glob("iter_*") if (p / "trainer_state.pt").is_file()] if directory.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def load_checkpoint(path, state: PPOState) -> PPOState:
    """Restore a checkpoint into an existing state (the same modules and optimisers keep being used)."""
    from minicai.model import Transformer
    from minicai.reward import RewardModel

    path = Path(path)
    try:
        trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise MinicaiError(f"{path / 'trainer_state.pt'}: cannot be read ({e}). Fix: delete {path} to resume "
                           "from the previous checkpoint, or start a fresh run with another --out.") from None
    device, dtype = state.policy.device, state.policy.dtype
    policy = Transformer.from_pretrained(path / "policy", dtype=dtype, device=device)
    missing = {"iteration", "beta", "policy_opt", "value_opt"} - set(trainer if isinstance(trainer, dict) else ())
    if missing:
        raise MinicaiError(f"{path / 'trainer_state.pt'}: no {', '.join(sorted(missing))} (not a checkpoint of "
                           f"train_rl.py). Fix: delete {path} to resume from the previous checkpoint, or start a "
                           "fresh run with another --out.")
    if (state.value_model is None) != (trainer["value_opt"] is None):
        written, now = ("gae", "grpo/rloo") if trainer["value_opt"] is not None else ("grpo/rloo", "gae")
        raise MinicaiError(f"{path} was written by a run with --advantage {written}; this run has --advantage {now}. "
                           f"Fix: resume with --advantage {written}, or start a fresh run with another --out.")
    with torch.no_grad():
        state.policy.load_state_dict(policy.state_dict())
    state.policy_opt.load_state_dict(trainer["policy_opt"])
    if state.value_model is not None:
        value = RewardModel.from_pretrained(path / "value", dtype=next(state.value_model.parameters()).dtype,
                                            device=device)
        with torch.no_grad():
            state.value_model.load_state_dict(value.state_dict())
        state.value_opt.load_state_dict(trainer["value_opt"])
    if trainer.get("scalers") and state.scalers:  # fp16 runs: the loss scale too
        for scaler, saved in zip(state.scalers, trainer["scalers"]):
            scaler.load_state_dict(saved)
    state.kl_ctl.beta = float(trainer["beta"])
    state.iteration = int(trainer["iteration"])
    return state
