"""The math of Constitutional AI training as pure functions over tensors (the project's test oracle).

Covers the three stages of Bai et al. 2022 (arXiv 2212.08073): supervised learning on revisions (SL-CAI, sec. 3),
the preference model trained on AI feedback (sec. 4.1), and RL from AI feedback with PPO (sec. 4; PPO of
Schulman et al. 2017, arXiv 1707.06347; the KL-penalised reward of Ziegler et al. 2019, arXiv 1909.08593).

Conventions
- Masks are 0/1 (bool, int or float) with the shape of the tensor they select from; 1 = a real token that counts.
  Values outside the mask never leak into a result, even when they are inf or nan.
- Every function keeps float64 inputs in float64, so it can check other code exactly. Log-probabilities and
  entropies are computed in at least float32, whatever the logits' dtype.
- "Masked mean" is a mean over all selected elements of the batch (token-weighted), not a mean of row means.
- Nothing here detaches: callers detach whatever should act as a constant (old log-probs, rewards, advantages).
- Bad arguments (mismatched shapes, unknown estimator names) raise ValueError; these are programming errors.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor
import torch.nn.functional as F

KL_KINDS = ("k1", "abs", "k2", "k3")


# ---------------------------------------------------------------------------------------------------------------------
# Masked reductions


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; pass tensors of one shape (masks match the values they select)")


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The 0/1 mask in the dtype of `like` (bool/int masks become 0.0/1.0)."""
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask == 1 (over all elements, or along `dim`). Entries outside the mask are ignored entirely."""
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the elements where mask == 1 (over all elements, or along `dim`).

    The count is clamped to at least 1, so an empty mask (or an empty row with `dim`) gives 0 rather than nan."""
    count = _float_mask(mask, x).expand_as(x)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the elements where mask == 1 (a scalar over the whole batch); n = mask.sum().

    unbiased=True applies Bessel's correction, n / (n - 1), as TRL and verl do. unbiased=False is the population
    variance sum (x - mean)^2 / n, as lm-human-preferences (tf.nn.moments) and OpenRLHF use. Needs n >= 2 when
    unbiased (Bessel with n = 1 divides by 0), n >= 1 otherwise."""
    n = float(_float_mask(mask, x).expand_as(x).sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} selected elements, the mask selects {n:g}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # population variance: sum (x - mean)^2 / n
    return var * (n / (n - 1)) if unbiased else var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True) -> Tensor:
    """Normalise x to mean 0 and variance 1 over the mask: (x - mean) / sqrt(var + eps).

    Used on PPO advantages (and optionally rewards). var is Bessel-corrected by default (TRL, verl); unbiased=False
    gives lm-human-preferences' and OpenRLHF's population variance. With shift_mean=False the mean is added back, so
    only the scale changes. Entries outside the mask are set to 0."""
    m = _float_mask(mask, x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities, supervised loss, entropy


def _as_tensor(x: Tensor | float) -> Tensor:
    """Tensors pass through; Python floats become float64 tensors (not torch's float32 default)."""
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def temper(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature: the sampling distribution's logits. At temperature 1 the logits themselves (dividing by
    1 is exactly the identity, so this only skips a pass over a [..., V] tensor)."""
    return logits if temperature == 1 else logits / temperature


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] at every position: [B, T, V], [B, T] -> [B, T].

    Computed in float32 (float64 stays float64). The temperature must match the one used for sampling, so that the
    PPO ratio compares the policy against the distribution the samples came from."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; greedy decoding has no log-probabilities")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree; want [B,T,V], [B,T]")
    z = temper(logits.to(_compute_dtype(logits)), temperature)  # [B, T, V]
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(z, dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token given the ones before it: [B, T, V], [B, T] -> [B, T - 1].

    A causal LM's logits at position t predict token t + 1, so out[:, t] = log p(input_ids[:, t + 1] | ids[:, :t + 1]).
    The first token has no prediction."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Next-token cross-entropy for SL-CAI (sec. 3): mean over the target tokens with loss_mask == 1.

    loss_mask [B, T] marks *target* tokens (e.g. 1 on the assistant's revision and its end-of-turn token, 0 on the
    prompt). Position t of the logits is scored on token t + 1, which counts iff loss_mask[:, t + 1] == 1;
    loss_mask[:, 0] is ignored since no logit predicts the first token. The mean is over all counted tokens of the
    batch (token-weighted); an all-zero mask gives 0."""
    _check_shapes(input_ids=input_ids, loss_mask=loss_mask)
    logp = sequence_logprobs(logits, input_ids)  # [B, T-1]
    return -masked_mean(logp, loss_mask[:, 1:])


def entropy_from_logits(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Masked mean of the entropy -sum_v p_v log p_v (nats) of softmax(logits / T): [B, T, V], [B, T] -> scalar.

    The entropy of the sampling distribution needs the sampling temperature: pass raw logits and the temperature, or
    logits already divided by it and temperature=1 (never both; TRL and verl take the tempered entropy, OpenRLHF took
    the raw one until its PR #1319, up to 1 nat per token apart at T = 0.5). float32 at least; tokens with probability
    0 (logit -inf) contribute 0, with a finite gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return masked_mean(token_entropy(logits, temperature), mask)


ENTROPY_CHUNK = 2**19  # elements of the [positions, V] pieces token_entropy works on (2 MiB in float32)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The entropy (nats) of softmax(logits / T) at every position: [..., V] -> [...] (see entropy_from_logits).

    Computed a few positions at a time (ENTROPY_CHUNK elements): the log-softmax, the probabilities and their
    product then exist for those positions only, never as [B, T, V] float32 tensors, and stay in the CPU's cache
    (on the CPU about 2x faster at V = 49152). Each position's value does not depend on the split: the same
    operations run along V, so the result equals the one-piece computation bit for bit (tests/test_losses.py)."""
    V = logits.shape[-1]
    parts = []
    for piece in logits.reshape(-1, V).split(max(1, ENTROPY_CHUNK // V)):  # [n, V]
        logp = torch.log_softmax(temper(piece.to(_compute_dtype(piece)), temperature), dim=-1)
        p = logp.exp()
        logp = logp.masked_fill(~torch.isfinite(logp), 0.0)  # 0 * log 0 := 0 without nan gradients
        parts.append(-(p * logp).sum(-1))  # [n]
    return torch.cat(parts).reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------------
# Preference model (sec. 4.1)


def bradley_terry_loss(r_a: Tensor, r_b: Tensor, p_a: Tensor) -> Tensor:
    """Soft-label Bradley-Terry preference-model loss (sec. 4.1), mean over the batch: [B], [B], [B] -> scalar.

    -[p log sigmoid(rA - rB) + (1 - p) log sigmoid(rB - rA)], where p = P(A is better) is the feedback model's
    normalised probability (a soft target; hard labels are p in {0, 1}). Minimised at sigmoid(rA - rB) = p."""
    _check_shapes(r_a=r_a, r_b=r_b, p_a=p_a)
    d = r_a - r_b
    p = p_a.to(d.dtype)
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def preference_accuracy(r_a: Tensor, r_b: Tensor, p_a: Tensor) -> float:
    """Share of comparisons where the PM ranks the labelled-better answer strictly higher.

    p_a > 0.5 counts as "A is better" (correct iff rA > rB), p_a < 0.5 as "B is better" (correct iff rB > rA); a tie
    rA == rB is wrong. Records with p_a == 0.5 carry no preference and are left out. nan when none are left."""
    _check_shapes(r_a=r_a, r_b=r_b, p_a=p_a)
    keep = p_a != 0.5
    if not bool(keep.any()):
        return float("nan")
    correct = torch.where(p_a > 0.5, r_a > r_b, r_b > r_a)
    return float(correct[keep].double().mean())


def choice_probability(logp_a: Tensor | float, logp_b: Tensor | float) -> Tensor:
    """Normalised probability of option (A) from the feedback model's log-probs of "(A)" and "(B)" (sec. 4.1).

    softmax over the two = exp(la) / (exp(la) + exp(lb)) = sigmoid(la - lb); the probability mass on other tokens is
    dropped. Also accepts floats (computed in float64)."""
    return torch.sigmoid(_as_tensor(logp_a) - _as_tensor(logp_b))


def clamp_probability(p: Tensor | float, low: float = 0.4, high: float = 0.6) -> Tensor:
    """Clamp feedback probabilities into [low, high]. Sec. 4.1: chain-of-thought labels are near 0 or 1, so the paper
    clamps them to 40-60% to keep the PM's targets soft. Also accepts floats (as float64)."""
    if not low <= high:
        raise ValueError(f"clamp_probability needs low <= high, got low={low}, high={high}")
    return _as_tensor(p).clamp(low, high)


# ---------------------------------------------------------------------------------------------------------------------
# RL reward with a KL penalty (sec. 4; Ziegler et al. 2019)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of tokens sampled from the policy.

    With d = logp - ref_logp (so ref/policy = exp(-d)), following Schulman's "Approximating KL divergence" note:
      k1  = d                          unbiased, can be negative (Ziegler et al. / lm-human-preferences use this)
      abs = |d|
      k2  = d^2 / 2                    biased, low variance, >= 0
      k3  = exp(-d) - 1 + d            unbiased, >= 0  (= ref/policy - 1 - log(ref/policy))
    Under samples from the policy E[k1] = E[k3] = KL exactly."""
    _check_shapes(logp=logp, ref_logp=ref_logp)
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d  # expm1 keeps precision for small d
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_KINDS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last position with mask == 1 in each row: [B, T] -> [B] long. Every row needs a 1."""
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have an all-zero mask; every response needs at least one real token")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.zeros_like(positions)).max(dim=1).values


def per_token_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    kl_kind: str = "k1",
    truncated: Tensor | None = None,
    truncation_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The KL-penalised RL reward (sec. 4; Ziegler et al. 2019: R = r - beta * log(pi / pi_ref)) per response token.

    r_t = -beta * KL_t at every response token (KL_t from kl_penalty with `kl_kind`), and the preference model's
    score is added at the last real token (the last index with mask == 1; masks are right-padded with variable
    lengths). Rows with truncated == True (generation hit the length limit without a stop token) get
    score + truncation_penalty there instead.
    The sign convention: minicai ADDS the penalty, so it must be <= 0 (e.g. -1); a positive one would reward
    truncation and raises ValueError. TRL subtracts a positive `missing_eos_penalty`, lm-human-preferences replaces
    the score with -1 (minicai.oracle names all three).
    Shapes: score [B], logp/ref_logp/mask [B, T], truncated [B] bool. Returns (rewards [B, T], kl [B, T]), both 0
    where mask == 0."""
    _check_shapes(logp=logp, ref_logp=ref_logp, mask=mask)
    if truncation_penalty > 0:
        raise ValueError(f"truncation_penalty={truncation_penalty} is added to the score, so a positive value rewards "
                         "truncated responses; pass a value <= 0 (e.g. -1)")
    if score.shape != logp.shape[:1]:
        raise ValueError(f"score has shape {tuple(score.shape)}, want [B] = [{logp.shape[0]}]")
    m = _float_mask(mask, logp)
    kl = torch.where(m.bool(), kl_penalty(logp, ref_logp, kl_kind), logp.new_zeros(()))  # [B, T]
    final = score.to(logp.dtype)  # [B]
    if truncated is not None:
        if truncated.shape != score.shape:
            raise ValueError(f"truncated has shape {tuple(truncated.shape)}, want [B] = [{score.shape[0]}]")
        final = final + truncated.to(final.dtype) * truncation_penalty
    rewards = -beta * kl  # [B, T]
    last = last_token_index(mask)  # [B]
    rewards = rewards.scatter_add(1, last.unsqueeze(1), final.unsqueeze(1))
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017)


GAE_HOLES = ("end", "zero", "skip")


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95, hole: str = "end"
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, run backwards over T for the
    whole batch at once. Rewards and values count as 0 outside the mask, so nothing after the last real token (a
    padded value, a nan) bootstraps into it. returns = A + V, the value targets.
    `hole` is the rule for a mask == 0 slot inside a row (multi-turn observations, dropped tokens); the frameworks
    disagree, and all three agree on right padding:
      "end"   the slot ends the episode: V and A after it do not reach the tokens before it (minicai)
      "zero"  r = V = 0 at the slot and the recursion runs through it (OpenRLHF, TRL <= 0.11, NeMo-Aligner)
      "skip"  the slot is transparent: V_{t+1} and A_{t+1} are carried across it (verl since its PR #2337)
    Shapes [B, T] in, (advantages [B, T], returns [B, T]) out, both 0 where mask == 0."""
    _check_shapes(rewards=rewards, values=values, mask=mask)
    if hole not in GAE_HOLES:
        raise ValueError(f"unknown GAE hole rule {hole!r}; use one of {', '.join(GAE_HOLES)}")
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    m = _float_mask(mask, rewards).to(dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m.bool(), rewards.to(dtype), zero)
    v = torch.where(m.bool(), values.to(dtype), zero)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)  # V_{t+1}: 0 past the end
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)  # A_{t+1}: likewise
    for t in reversed(range(T)):
        a = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv  # [B]
        adv[:, t] = a * m[:, t]
        if hole == "end":  # a hole passes on V = A = 0
            next_value, next_adv = v[:, t], adv[:, t]
        elif hole == "zero":  # a hole passes on its own (unmasked) A, with V = 0
            next_value, next_adv = v[:, t], a
        else:  # "skip": a hole passes on what it received
            keep = m[:, t].bool()
            next_value = torch.where(keep, v[:, t], next_value)
            next_adv = torch.where(keep, a, next_adv)
    return adv, (adv + v) * m


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, masked mean over tokens.

    ratio = exp(logp - old_logp); loss = mean max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)), i.e. minus L^CLIP.
    Stats (detached 0-dim tensors):
      clipfrac   share of tokens where the clipped term is strictly larger, i.e. clipping is active and the token's
                 gradient is 0 (the lm-human-preferences / TRL convention; a ratio outside the range whose clipped
                 term is not the max does not count)
      approx_kl  masked mean of (logp - old_logp)^2 / 2, the k2 estimator of KL between old and new policy
      ratio_mean masked mean of the ratio"""
    _check_shapes(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio * log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (as in OpenAI baselines / lm-human-preferences):
    0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2) with V_clipped = old_V + clip(V - old_V, -clip, clip).

    Stats: vf_clipfrac, the share of tokens where the clipped error is strictly larger (detached 0-dim tensor)."""
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# Group baselines and loss aggregation (GRPO, Shao et al. 2024, arXiv 2402.03300; RLOO, Ahmadian et al. 2024,
# arXiv 2402.14740; Dr. GRPO, Liu et al. 2025, arXiv 2503.20783)

GROUP_BASELINES = ("mean", "leave_one_out")
GROUP_SCALES = ("std", "std_biased", "none")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")


def group_advantages(scores: Tensor, baseline: str = "mean", scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Sequence-level advantages from G samples of each of P prompts: [P, G] -> [P, G].

    A = (s - b) / (sd + eps), with the baseline b
      "mean"           the group mean (GRPO)
      "leave_one_out"  the mean of the other G - 1 samples, (sum - s) / (G - 1) (RLOO; needs G >= 2)
    and the scale sd
      "std"            the group's standard deviation with Bessel's correction (torch.std; TRL, verl, OpenRLHF)
      "std_biased"     the population standard deviation (divide by G)
      "none"           no scaling and no eps (Dr. GRPO, RLOO): A = s - b
    A group of one sample has no spread: its "std" is taken as 1 (as verl does), so its GRPO advantage is 0.
    A group whose scores are all equal carries no signal: its advantages are exactly 0. (Computed, s - b would be the
    rounding error of the mean, up to 1 ulp of s, and 1 / (sd + eps) with sd ~ 0 scales that to about +-0.5 in
    float32 at eps = 1e-6.)"""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [P, G] (prompts x samples), got shape {tuple(scores.shape)}")
    if baseline not in GROUP_BASELINES or scale not in GROUP_SCALES:
        raise ValueError(f"unknown baseline {baseline!r} or scale {scale!r}; baselines {GROUP_BASELINES}, "
                         f"scales {GROUP_SCALES}")
    G = scores.shape[1]
    s = scores.to(_compute_dtype(scores))
    if baseline == "mean":
        b = s.mean(dim=1, keepdim=True)  # [P, 1]
    else:
        if G < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
        b = (s.sum(dim=1, keepdim=True) - s) / (G - 1)  # [P, G]
    same = (s == s[:, :1]).all(dim=1, keepdim=True)  # [P, 1]: no spread, no signal
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if scale == "none":
        return torch.where(same, zero, s - b)
    if G == 1:
        sd = torch.ones_like(s[:, :1])
    else:
        sd = s.std(dim=1, keepdim=True, correction=1 if scale == "std" else 0)  # [P, 1]
    return torch.where(same, zero, (s - b) / (sd + eps))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    constant: float | None = None,
    global_tokens: float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar; the frameworks' names for the modes:
      "token-mean"              sum over valid tokens / their number (PPO, DAPO). With global_tokens, divide by
                                that count instead (the tokens of the whole batch across micro-batches and ranks),
                                so that the micro-batch losses add up to the batch's token mean whatever the split
      "seq-mean-token-mean"     mean over non-empty rows of each row's token mean (GRPO as published)
      "seq-mean-token-sum"      mean over non-empty rows of each row's token sum
      "seq-mean-token-sum-norm" sum over all valid tokens / constant (Dr. GRPO; constant = B * max length in TRL
                                and in verl 0.9; verl 0.8 divided by the max length alone, so its loss grew with the
                                batch, verl #3741)
      "token-sum"               sum over valid tokens, no normaliser (verl 0.9)
    Rows with no valid token are left out of the row means; an empty batch gives 0."""
    _check_shapes(per_token=per_token, mask=mask)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; use one of {', '.join(AGG_MODES)}")
    if global_tokens is not None and mode != "token-mean":
        raise ValueError(f"global_tokens applies to token-mean only, not {mode!r}")
    if mode == "token-mean":
        if global_tokens is None:
            return masked_mean(per_token, mask)
        if global_tokens <= 0:
            raise ValueError(f"global_tokens must be > 0, got {global_tokens}")
        return masked_sum(per_token, mask) / global_tokens
    if mode == "token-sum":
        return masked_sum(per_token, mask)
    if mode == "seq-mean-token-sum-norm":
        if constant is None or constant <= 0:
            raise ValueError(f"seq-mean-token-sum-norm divides by a constant > 0 (e.g. the maximum length), "
                             f"got {constant}")
        return masked_sum(per_token, mask) / constant
    row_sum = masked_sum(per_token, mask, dim=1)  # [B]
    count = _float_mask(mask, per_token).sum(dim=1)  # [B]
    rows = count > 0
    per_row = row_sum / count.clamp(min=1.0) if mode == "seq-mean-token-mean" else row_sum
    return masked_mean(per_row, rows)


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019)


@dataclass
class AdaptiveKLController:
    """Adapts beta so the policy's KL from the reference tracks `target` (Ziegler et al. 2019's log-space proportional
    controller, in lm-human-preferences' form): error = clip((KL - target) / target, -0.2, 0.2);
    beta <- beta * (1 + error * n_steps / horizon), n_steps = episodes since the last update."""

    init_beta: float
    target: float
    horizon: float
    beta: float = field(init=False)

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={self.target}, horizon={self.horizon}")
        self.beta = float(self.init_beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """One adjustment after `n_steps` samples (episodes) with mean KL `current_kl`; returns the new beta."""
        error = min(max((float(current_kl) - self.target) / self.target, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


@dataclass
class FixedKLController:
    """A constant beta; update does nothing (same interface as AdaptiveKLController)."""

    beta: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta


# ---------------------------------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023, arXiv 2305.18290), on the same AI-labelled pairs as the preference model
#
# DPO skips the preference model: the policy's own log-ratio to the frozen reference, scaled by beta, plays the
# part of the PM score (the "implicit reward", eq. 5), and the Bradley-Terry loss is applied to it directly (eq. 7).
# Sequence log-probs below are sums over the response tokens: log pi(y|x) = sum_t log pi(y_t | x, y_<t).
# The preference accuracy of implicit rewards is `preference_accuracy` above, applied to dpo_implicit_rewards.


def dpo_implicit_rewards(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward of each response, beta * (log pi(y|x) - log pi_ref(y|x)): [B], [B] -> [B].

    Rafailov et al. 2023, eq. 5, without the term beta * log Z(x), which is the same for both responses to a prompt
    and cancels in every comparison. 0 for every response while the policy equals the reference."""
    _check_shapes(logp=logp, ref_logp=ref_logp)
    return beta * (logp - ref_logp)


def dpo_log_ratio_difference(logp_a: Tensor, logp_b: Tensor, ref_logp_a: Tensor, ref_logp_b: Tensor) -> Tensor:
    """h = (log pi(y_A) - log pi_ref(y_A)) - (log pi(y_B) - log pi_ref(y_B)): [B] x 4 -> [B].

    The argument of the sigmoid in eq. 7 (times beta); positive when the policy has moved toward A more than B."""
    _check_shapes(logp_a=logp_a, logp_b=logp_b, ref_logp_a=ref_logp_a, ref_logp_b=ref_logp_b)
    return (logp_a - ref_logp_a) - (logp_b - ref_logp_b)


def dpo_loss(
    logp_a: Tensor,
    logp_b: Tensor,
    ref_logp_a: Tensor,
    ref_logp_b: Tensor,
    p_a: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Soft-label DPO loss, mean over the batch: -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)].

    h = dpo_log_ratio_difference(...), p = P(A is better) [B]. Rafailov et al. 2023, eq. 7 is the hard-label case
    p = 1 (A the chosen response). Label smoothing eps, the "conservative DPO" (cDPO) of Mitchell 2023 ("A note on
    DPO with noisy preferences"), moves every label toward 1/2: p -> eps + (1 - 2 eps) p, so a hard label becomes
    1 - eps; eps = 0 (default) leaves p as it is.

    Which setting is paper-faithful for Constitutional AI: soft labels with eps = 0. Bai et al. 2022, section 4.1,
    trains the PM on soft targets, the feedback model's normalised probabilities of (A) and (B) (clamped to 40-60%
    with chain of thought), never on their argmax. This loss is that same Bradley-Terry loss (bradley_terry_loss)
    with the implicit reward beta * log(pi / pi_ref) in place of the PM's score, so DPO fits exactly the
    preferences the paper's PM fits. Hard labels throw away the feedback model's confidence, and with them the loss
    keeps falling as |h| grows without bound; a soft label p is minimised at the finite sigmoid(beta h) = p.

    log sigmoid is computed with F.logsigmoid, so the loss stays finite for any |beta h|. float64 stays float64."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    _check_shapes(logp_a=logp_a, p_a=p_a)
    z = beta * dpo_log_ratio_difference(logp_a, logp_b, ref_logp_a, ref_logp_b)  # [B]
    p = label_smoothing + (1.0 - 2.0 * label_smoothing) * p_a.to(z.dtype)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()


def reward_margin(r_a: Tensor, r_b: Tensor, p_a: Tensor) -> float:
    """Mean of r_better - r_worse over the decided comparisons (p_a > 0.5: A is better, p_a < 0.5: B is better;
    p_a == 0.5 is left out), as a float. Positive when the rewards agree with the labels; nan when none are decided.

    For DPO, r = dpo_implicit_rewards(...), so the margin of a pair is beta * h, oriented by its label."""
    _check_shapes(r_a=r_a, r_b=r_b, p_a=p_a)
    keep = p_a != 0.5
    if not bool(keep.any()):
        return float("nan")
    margin = torch.where(p_a > 0.5, r_a - r_b, r_b - r_a)
    return float(margin[keep].double().mean())
