"""Reference PPO/GRPO math parameterised by a `Convention`, in float64.

Each function computes one stage the way the named convention does, on response-aligned [B, T] tensors (position t
= response token t, right-padded). Where a convention agrees with minicai the work is done by minicai/losses.py;
only the departures (clamps, score slots, masks, epsilons) are written here.
"""

import torch
from torch import Tensor

from minicai import losses as L
from minicai.oracle.conventions import Convention

D = torch.float64
TRL_TEMPERATURE_EPS = 1e-7  # TRL adds it to the temperature (trl-ppo profile, logprob_temperature="divide_eps")


def f64(x: Tensor) -> Tensor:
    return x.to(D)


# ---------------------------------------------------------------------------------------------------------------------
# Masks


def response_mask(conv: Convention, ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Which response tokens are valid: [B, T] ids -> [B, T] float64 0/1.

    through_eos  everything up to and including the first EOS (pad after it)
    non_pad      every token that is not the pad id, cut at the first pad (so with pad == eos the EOS is NOT valid)
    all          every position (fixed-length responses)"""
    B, T = ids.shape
    if conv.mask_rule == "all":
        return torch.ones(B, T, dtype=D)
    stop = (ids == eos_id) if conv.mask_rule == "through_eos" else (ids == pad_id)
    first = torch.where(stop.any(1), stop.int().argmax(1), torch.full((B,), T))  # [B] first stop (or T)
    pos = torch.arange(T).expand(B, T)
    keep = pos <= first.unsqueeze(1) if conv.mask_rule == "through_eos" else pos < first.unsqueeze(1)
    return keep.to(D)


def _extend(mask: Tensor, k: int) -> Tensor:
    """The mask plus the k slots after each row's last valid token (slots 0..k-1 for an empty row, as TRL's
    `sequence_length + 1` and DeepSpeed-Chat's `ends` give)."""
    if k == 0:
        return mask
    pos = torch.arange(mask.shape[1]).expand_as(mask)
    last = last_valid(mask).unsqueeze(1)  # [B, 1], -1 for an empty row
    return torch.maximum(mask, ((pos > last) & (pos <= last + k)).to(mask.dtype))


def gae_mask(conv: Convention, mask: Tensor) -> Tensor:
    """Where rewards and values enter GAE: the valid tokens plus `value_extra` slots after them (TRL and
    DeepSpeed-Chat keep the slot after the last valid token), or every position (fixed length, "all"). Conventions
    whose recursion takes no mask (gae_hole "none") see no holes: every slot up to the last valid one counts."""
    m = f64(mask)
    if conv.value_mask == "all":
        return torch.ones_like(m)
    if conv.gae_hole == "none":  # no mask inside the recursion: everything up to the last valid token (+ extra)
        pos = torch.arange(m.shape[1]).expand_as(m)
        return (pos <= last_valid(m).unsqueeze(1) + conv.value_extra).to(D)
    return _extend(m, conv.value_extra)


def value_mask(conv: Convention, mask: Tensor) -> Tensor:
    """Where the value loss counts: the valid tokens, one slot more ("valid_p1", TRL), or everything ("all")."""
    m = f64(mask)
    if conv.value_mask == "all":
        return torch.ones_like(m)
    return _extend(m, 1) if conv.value_mask == "valid_p1" else m


def last_valid(mask: Tensor) -> Tensor:
    """Index of the last valid token per row; -1 for an all-masked row (the frameworks disagree on what to do)."""
    m = mask.bool()
    pos = torch.arange(m.shape[1]).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, -1)).max(1).values


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities, KL, entropy


def effective_temperature(conv: Convention, temperature: float) -> float:
    if conv.logprob_temperature == "none":
        return 1.0
    return temperature + TRL_TEMPERATURE_EPS if conv.logprob_temperature == "divide_eps" else temperature


def logprobs(conv: Convention, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log p(token) under the convention's temperature rule: [B, T, V] response-aligned logits, [B, T] -> [B, T]."""
    return L.token_logprobs(f64(logits), tokens, effective_temperature(conv, temperature))


def kl(conv: Convention, logp: Tensor, ref_logp: Tensor, name: str, logits: Tensor | None = None,
       ref_logits: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Per-token KL estimate under an advertised estimator name, with the convention's clamps: [B, T] -> [B, T].

    "full" (TRL <= 0.11) is the exact KL over the vocabulary and needs both logits [B, T, V]."""
    kind = conv.kl_kind(name)
    if kind == "full":
        if logits is None or ref_logits is None:
            raise ValueError("the 'full' KL needs the policy's and the reference's logits")
        t = effective_temperature(conv, temperature)
        lp, lq = torch.log_softmax(f64(logits) / t, -1), torch.log_softmax(f64(ref_logits) / t, -1)
        return (lp.exp() * (lp - lq)).sum(-1)
    d = f64(logp) - f64(ref_logp)
    if kind in conv.kl_log_ratio_clamp_kinds and conv.kl_log_ratio_clamp is not None:
        d = d.clamp(*conv.kl_log_ratio_clamp)
    out = L.kl_penalty(d, torch.zeros_like(d), kind)
    if kind in conv.kl_clamp_kinds and conv.kl_result_clamp is not None:
        out = out.clamp(-conv.kl_result_clamp, conv.kl_result_clamp)
    return out


def entropy_tokens(conv: Convention, logits: Tensor, temperature: float) -> Tensor:
    """Per-token entropy (nats) of softmax(logits / T) ("tempered") or softmax(logits) ("raw"): [B, T, V] -> [B, T]."""
    t = effective_temperature(conv, temperature) if conv.entropy_logits == "tempered" else 1.0
    logp = torch.log_softmax(f64(logits) / t, dim=-1)
    return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)


def adaptive_kl_measure(conv: Convention, kl_tokens: Tensor, mask: Tensor) -> Tensor:
    """The KL the adaptive controller compares with its target: the batch mean of each row's KL sum (Ziegler et
    al., lm-human-preferences, TRL 0.11) or of each row's token mean (verl)."""
    m = f64(mask)
    if conv.adaptive_kl_input == "seq_token_mean":
        return (L.masked_sum(f64(kl_tokens), m, dim=1) / (m.sum(1) + conv.masked_mean_eps).clamp(min=1e-300)).mean()
    return L.masked_sum(f64(kl_tokens), m, dim=1).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Rewards and advantages


def score_slot(conv: Convention, mask: Tensor) -> Tensor:
    """The response position that receives the scalar score: [B, T] -> [B] long."""
    B, T = mask.shape
    if conv.score_position == "last_column":
        return torch.full((B,), T - 1)
    last = last_valid(mask)  # -1 on an empty row
    empty = last < 0
    if empty.any() and conv.empty_row == "error":
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} have no valid token; no slot for the score")
    if conv.score_position == "after_last_valid":  # one past the last valid token, or the last one if it is at T-1
        return torch.where(last + 1 < T, last + 1, last)  # an empty row: slot 0
    return torch.where(empty, torch.full_like(last, T - 1), last)  # index -1 wraps to the last slot


def final_score(conv: Convention, score: Tensor, truncated: Tensor | None, penalty: float) -> Tensor:
    """The score after the missing-EOS rule: add a penalty <= 0, subtract a penalty >= 0, or replace the score."""
    s = f64(score)
    if conv.score_clip is not None:
        s = s.clamp(-conv.score_clip, conv.score_clip)
    if truncated is None or conv.missing_eos == "none":
        return s
    tr = truncated.bool()
    if conv.missing_eos == "add":
        if penalty > 0:
            raise ValueError(f"{conv.name} adds the penalty to the score; {penalty} > 0 would reward truncation")
        return s + tr.to(D) * penalty
    if conv.missing_eos == "subtract":
        if penalty < 0:
            raise ValueError(f"{conv.name} subtracts the penalty from the score; {penalty} < 0 would reward truncation")
        return s - tr.to(D) * penalty
    return torch.where(tr, torch.full_like(s, penalty), s)


def token_rewards(conv: Convention, score: Tensor, kl_tokens: Tensor, mask: Tensor, beta: float,
                  truncated: Tensor | None = None, penalty: float = 0.0) -> Tensor:
    """r_t = -beta * KL_t (where the convention counts KL) plus the score at the convention's slot: [B, T]."""
    m = f64(mask)
    k = f64(kl_tokens)
    k = k if conv.after_eos == "trained" else torch.where(m.bool(), k, torch.zeros((), dtype=D))
    r = -beta * k + 0.0  # + 0.0: no negative zeros
    slot = score_slot(conv, m)
    return r.scatter_add(1, slot.unsqueeze(1), final_score(conv, score, truncated, penalty).unsqueeze(1))


def advantages(conv: Convention, rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
               ) -> tuple[Tensor, Tensor]:
    """Raw GAE advantages and returns, [B, T] each, under the convention's mask and hole rule (losses.gae).

    The recursion runs over the value mask (TRL and DeepSpeed-Chat keep rewards and values one slot past the last
    valid token, lm-human-preferences everything); outside it both are 0."""
    vm = gae_mask(conv, mask)
    hole = "end" if conv.gae_hole == "none" else conv.gae_hole
    return L.gae(f64(rewards), f64(values), vm, gamma, lam, hole=hole)


def whiten(conv: Convention, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Advantage whitening under the convention's variance, epsilon and masked-mean rules; 0 outside the mask.
    Conventions without whitening return x (masked)."""
    m = f64(mask)
    x = torch.where(m.bool(), f64(x), torch.zeros((), dtype=D))
    if conv.whiten_var == "none":
        return x
    unbiased = conv.whiten_var == "unbiased"
    if conv.whiten_eps_mode == "add" and conv.masked_mean_eps == 0.0:
        return L.whiten(x, m, shift_mean=shift_mean, eps=conv.whiten_eps, unbiased=unbiased)
    n = float(m.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"whitening needs at least {2 if unbiased else 1} valid tokens, got {n:g}")
    mean = L.masked_sum(x, m) / (n + conv.masked_mean_eps)
    var = L.masked_sum((x - mean) ** 2, m) / (n + conv.masked_mean_eps)
    if unbiased:
        var = var * n / (n - 1)
    scale = torch.rsqrt(var + conv.whiten_eps) if conv.whiten_eps_mode == "add" else torch.rsqrt(
        var.clamp(min=conv.whiten_eps))
    out = (x - mean) * scale + (0 if shift_mean else mean)
    return torch.where(m.bool(), out, torch.zeros((), dtype=D))


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def policy_loss_tokens(conv: Convention, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor,
                       clip_low: float = 0.2, clip_high: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-token PPO loss max(-A r, -A clip(r)) with the convention's log-ratio clamp and dual-clip, and the per-token
    clipped flag: ([B, T], [B, T])."""
    d = f64(logp) - f64(old_logp)
    if conv.log_ratio_masked:
        d = d * f64(mask)
    if conv.log_ratio_clamp is not None:
        d = d.clamp(-conv.log_ratio_clamp, conv.log_ratio_clamp)
    ratio = torch.exp(d)
    a = f64(adv)
    high = clip_low if clip_high is None else clip_high
    pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - clip_low, 1 + high)
    out = torch.maximum(pg1, pg2)
    if conv.dual_clip is not None:
        out = torch.where(a < 0, torch.minimum(out, -a * conv.dual_clip), out)
    return out, (pg2 > pg1).to(D)


def aggregate(conv: Convention, per_token: Tensor, mask: Tensor, mode: str | None = None,
              constant: float | None = None, global_tokens: float | None = None) -> Tensor:
    """losses.aggregate_loss with the convention's default mode."""
    return L.aggregate_loss(f64(per_token), f64(mask), mode or conv.pg_agg, constant, global_tokens)


def value_loss_tokens(conv: Convention, values: Tensor, old_values: Tensor, returns: Tensor,
                      clip: float | None = None) -> Tensor:
    """0.5 * max((V - R)^2, (V_clip - R)^2) per token, V_clip = old + clip(V - old, -c, c): [B, T]."""
    c = conv.value_clip if clip is None else clip
    v, o, r = f64(values), f64(old_values), f64(returns)
    return 0.5 * torch.maximum((v - r) ** 2, (o + (v - o).clamp(-c, c) - r) ** 2)


def value_loss(conv: Convention, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float | None = None) -> Tensor:
    """The value loss over the convention's value mask (TRL's includes the slot after the last valid token)."""
    return aggregate(conv, value_loss_tokens(conv, values, old_values, returns, clip), value_mask(conv, mask))


# ---------------------------------------------------------------------------------------------------------------------
# GRPO family: group baselines as each framework spells them (eps on the std differs)

GROUP_ESTIMATORS: dict[str, dict] = {
    "grpo-trl": {"baseline": "mean", "scale": "std", "eps": 1e-4},  # trl grpo_trainer.py:2687-2707
    "grpo-verl": {"baseline": "mean", "scale": "std", "eps": 1e-6},  # verl core_algos.py:266-331
    "group_norm-openrlhf": {"baseline": "mean", "scale": "std", "eps": 1e-9},  # experience_maker.py:264-270
    "rloo": {"baseline": "leave_one_out", "scale": "none", "eps": 0.0},  # OpenRLHF / TRL RLOO
    "dr-grpo": {"baseline": "mean", "scale": "none", "eps": 0.0},  # Liu et al. 2025: no std
    "grpo-biased-std": {"baseline": "mean", "scale": "std_biased", "eps": 1e-6},
}


def group_advantages(scores: Tensor, estimator: str) -> Tensor:
    """[P, G] scores -> [P, G] advantages under a named estimator (GROUP_ESTIMATORS)."""
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group estimator {estimator!r}; known: {', '.join(GROUP_ESTIMATORS)}")
    return L.group_advantages(f64(scores), **GROUP_ESTIMATORS[estimator])
