"""Specification of minicai/losses.py: every formula against numbers worked out by hand in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from minicai import losses as L


D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


# Right padding with different lengths per row; the middle row is the padded one. Masked slots hold garbage
# (huge numbers, inf, nan) which must never reach a result.
MASK = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
GARBAGE = 1e6


# ---------------------------------------------------------------------------------------------------------------------
# masked reductions and whitening


def test_masked_sum_and_mean_by_hand():
    x = t([[1.0, 2.0, float("nan")], [float("inf"), 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    close(L.masked_sum(x, mask), 1 + 2 + 6)
    close(L.masked_mean(x, mask), (1 + 2 + 6) / 3)
    close(L.masked_mean(x, mask, dim=1), [(1 + 2) / 2, 6.0])
    close(L.masked_mean(x, mask, dim=0), [1.0, 2.0, 6.0])
    close(L.masked_sum(x, mask, dim=1), [3.0, 6.0])
    # bool and float masks mean the same
    close(L.masked_mean(x, mask.bool()), L.masked_mean(x, mask.to(D)))


def test_masked_mean_of_empty_row_is_zero():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    mask = t([[1, 1], [0, 0]])
    close(L.masked_mean(x, mask, dim=1), [1.5, 0.0])
    close(L.masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_var_bessel_by_hand():
    x = t([[1.0, 2.0, GARBAGE], [3.0, 5.0, -GARBAGE]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    # values 1, 2, 3, 5: mean 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75
    close(L.masked_var(x, mask), 8.75 / 3)  # unbiased: divide by n - 1
    close(L.masked_var(x, mask, unbiased=False), 8.75 / 4)
    close(L.masked_var(x, mask), torch.var(t([1.0, 2.0, 3.0, 5.0]), correction=1))
    with pytest.raises(ValueError):
        L.masked_var(x, t([[1, 0, 0], [0, 0, 0]]))


def test_whiten_by_hand():
    x = t([[1.0, 2.0, GARBAGE], [3.0, 5.0, -GARBAGE]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    scale = 1 / math.sqrt(8.75 / 3 + 1e-8)
    want = [[(1 - 2.75) * scale, (2 - 2.75) * scale, 0.0], [(3 - 2.75) * scale, (5 - 2.75) * scale, 0.0]]
    close(L.whiten(x, mask), want)
    want_kept = [[v + 2.75 if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(want, mask.tolist())]
    close(L.whiten(x, mask, shift_mean=False), want_kept)


def test_whiten_gives_mean_0_and_unbiased_var_1_over_the_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=D) * 3 + 7
    x = torch.where(MASK.bool(), x, t(GARBAGE))
    w = L.whiten(x, MASK, eps=0.0)
    close(L.masked_mean(w, MASK), 0.0)
    close(L.masked_var(w, MASK, unbiased=True), 1.0)
    n = MASK.sum().item()
    close(L.masked_var(w, MASK, unbiased=False), (n - 1) / n)  # the population variance is not 1
    assert (w[~MASK.bool()] == 0).all()
    kept = L.whiten(x, MASK, shift_mean=False, eps=0.0)
    close(L.masked_mean(kept, MASK), L.masked_mean(x, MASK))
    close(L.masked_var(kept, MASK), 1.0)


def test_whiten_biased_uses_the_population_variance():
    x = t([[1.0, 2.0, GARBAGE], [3.0, 5.0, -GARBAGE]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    scale = 1 / math.sqrt(8.75 / 4 + 1e-8)  # lm-human-preferences / OpenRLHF: divide by n, not n - 1
    close(L.whiten(x, mask, unbiased=False), [[-1.75 * scale, -0.75 * scale, 0.0], [0.25 * scale, 2.25 * scale, 0.0]])


# ---------------------------------------------------------------------------------------------------------------------
# log-probabilities, SFT loss, entropy


def test_token_logprobs_by_hand():
    logits = t([[[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0]]])  # probs 1/6, 2/6, 3/6 and uniform
    tokens = torch.tensor([[2, 0]])
    close(L.token_logprobs(logits, tokens), [[math.log(3 / 6), math.log(1 / 3)]])
    # temperature 2 divides the logits: probs proportional to 1, sqrt 2, sqrt 3
    z = 1 + math.sqrt(2) + math.sqrt(3)
    close(L.token_logprobs(logits, tokens, temperature=2.0), [[math.log(math.sqrt(3) / z), math.log(1 / 3)]])
    with pytest.raises(ValueError):
        L.token_logprobs(logits, tokens, temperature=0.0)


def test_token_logprobs_dtypes():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[0, 1, 4], [3, 3, 2]])
    assert L.token_logprobs(logits.to(torch.bfloat16), tokens).dtype == torch.float32
    assert L.token_logprobs(logits.half(), tokens).dtype == torch.float32
    assert L.token_logprobs(logits.double(), tokens).dtype == torch.float64
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(L.token_logprobs(logits.double(), tokens), ref)


def test_sequence_logprobs_shifts_by_one():
    probs = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
    logits = torch.log(t([probs])) + 4.0  # a constant shift changes nothing
    ids = torch.tensor([[0, 2, 1]])
    out = L.sequence_logprobs(logits, ids)
    assert out.shape == (1, 2)
    close(out, [[math.log(0.25), math.log(0.6)]])  # logits at t score token t + 1


def _sft_batch():
    # logits = log of explicit next-token distributions, so every log-prob is a hand number
    probs = [
        [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]],
        [[0.3, 0.3, 0.4], [0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]],
    ]
    ids = torch.tensor([[2, 1, 2], [0, 0, 0], [0, 2, 0]])
    return torch.log(t(probs)), ids


def test_sft_loss_by_hand_with_the_mask_on_targets():
    logits, ids = _sft_batch()
    # row 0: only its last token is a target (-> scored by position 1: p = 0.3);
    # row 1 (middle): nothing counts; row 2: mask on position 0 is ignored, targets 2 (p 0.6) and 0 (p 0.7)
    loss_mask = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 1, 1]])
    close(L.sft_loss(logits, ids, loss_mask), -(math.log(0.3) + math.log(0.6) + math.log(0.7)) / 3)
    # row 1 counting its first target (0 under [0.3, 0.3, 0.4]) changes the mean by hand too
    loss_mask[1, 1] = 1
    close(L.sft_loss(logits, ids, loss_mask), -(math.log(0.3) + math.log(0.3) + math.log(0.6) + math.log(0.7)) / 4)


def test_sft_loss_matches_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 7, generator=g, dtype=D)
    ids = torch.randint(0, 7, (3, 6), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]])
    targets = ids[:, 1:].masked_fill(loss_mask[:, 1:] == 0, -100)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    close(L.sft_loss(logits, ids, loss_mask), want)


def test_entropy_by_hand():
    logits = torch.log(t([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.25]], [[1.0, 1.0, 1.0], [GARBAGE, 0.0, 0.0]]]))
    logits[0, 1] = t([0.0, 0.0, 0.0])  # uniform over 3
    logits[1, 0] = t([0.0, 0.0, float("-inf")])  # uniform over 2, one impossible token
    mask = t([[1, 1], [1, 0]])
    h = [0.5 * math.log(2) + 0.5 * math.log(4), math.log(3), math.log(2)]
    logits.requires_grad_(True)
    ent = L.entropy_from_logits(logits, mask)
    close(ent.detach(), sum(h) / 3)
    ent.backward()
    assert torch.isfinite(logits.grad).all()
    assert L.entropy_from_logits(logits.detach().to(torch.bfloat16), mask).dtype == torch.float32


def test_entropy_at_temperature_half_by_hand():
    # p = (1/2, 1/4, 1/4) at T = 1; at T = 0.5, p ~ p^2 = (1/4, 1/16, 1/16) -> (2/3, 1/6, 1/6)
    logits = torch.log(t([[[0.5, 0.25, 0.25]]]))
    mask = t([[1]])
    h_half = -(2 / 3 * math.log(2 / 3) + 2 / 6 * math.log(1 / 6))
    close(L.entropy_from_logits(logits, mask, temperature=0.5), h_half)
    close(L.entropy_from_logits(logits / 0.5, mask), h_half)  # or pass tempered logits at temperature 1
    close(L.entropy_from_logits(logits, mask), 0.5 * math.log(2) + 0.5 * math.log(4))
    with pytest.raises(ValueError):
        L.entropy_from_logits(logits, mask, temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_in_pieces_equals_the_one_piece_formula_bit_for_bit(monkeypatch, dtype):
    """token_entropy works on a few positions at a time (ENTROPY_CHUNK elements); the values and gradients are
    those of the whole [B, T, V] formula, bit for bit, including -inf logits and a last piece that is shorter."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 7, 1000, generator=g) * 4).to(dtype)
    logits[1, 2, :300] = float("-inf")
    mask = (torch.rand(5, 7, generator=g) < 0.8).long()
    monkeypatch.setattr(L, "ENTROPY_CHUNK", 3 * 1000)  # pieces of 3 positions: 12 pieces, the last of 2
    results = []
    for whole in (False, True):
        x = logits.clone().requires_grad_(True)
        if whole:  # the definition, over the whole tensor at once
            logp = torch.log_softmax(x.float() / 0.7, dim=-1)
            ent = -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(-1)
            value = L.masked_mean(ent, mask)
        else:
            value = L.entropy_from_logits(x, mask, temperature=0.7)
        value.backward()
        results.append((value.detach(), x.grad))
    (ours, ours_grad), (want, want_grad) = results
    assert ours.dtype == torch.float32 and torch.equal(ours, want) and torch.equal(ours_grad, want_grad)
    assert L.token_entropy(logits[:1, :1]).shape == (1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# preference model


def test_bradley_terry_loss_and_gradient_by_hand():
    r_a = t([1.0, 0.5]).requires_grad_(True)
    r_b = t([0.0, 1.5]).requires_grad_(True)
    p = t([1.0, 0.75])
    loss = L.bradley_terry_loss(r_a, r_b, p)
    l0 = math.log(1 + math.exp(-1))  # -log sigmoid(1)
    l1 = 0.75 * math.log(1 + math.exp(1)) + 0.25 * math.log(1 + math.exp(-1))  # d = -1
    close(loss.detach(), (l0 + l1) / 2)
    loss.backward()
    # d/d rA of -[p log s(d) + (1-p) log s(-d)] = s(d) - p, and the mean divides by B = 2
    grad_a = [(sig(1) - 1.0) / 2, (sig(-1) - 0.75) / 2]
    close(r_a.grad, grad_a)
    close(r_b.grad, [-g for g in grad_a])


def test_bradley_terry_soft_label_minimum():
    # p = 0.5: minimised at rA == rB with loss log 2 and zero gradient, larger elsewhere
    r_a = t([0.7]).requires_grad_(True)
    loss = L.bradley_terry_loss(r_a, t([0.7]), t([0.5]))
    loss.backward()
    close(loss.detach(), math.log(2))
    close(r_a.grad, [0.0])
    for delta in (-1.0, -0.3, 0.3, 1.0):
        assert L.bradley_terry_loss(t([0.7 + delta]), t([0.7]), t([0.5])) > math.log(2) + 1e-6
    # p = 0.75: the gradient vanishes where sigmoid(rA - rB) = 0.75, i.e. rA - rB = log 3
    r_a = t([math.log(3)]).requires_grad_(True)
    L.bradley_terry_loss(r_a, t([0.0]), t([0.75])).backward()
    close(r_a.grad, [0.0], tol=1e-12)


def test_bradley_terry_is_stable_for_large_margins():
    loss = L.bradley_terry_loss(t([100.0], torch.float32), t([-100.0], torch.float32), t([0.0], torch.float32))
    assert torch.isfinite(loss)
    close(loss.double(), 200.0, tol=1e-5)


def test_preference_accuracy_by_hand():
    r_a = t([1.0, 0.0, 2.0, 3.0, 1.0])
    r_b = t([0.0, 1.0, 2.0, 1.0, 5.0])
    p_a = t([0.9, 0.2, 0.8, 0.5, 1.0])
    # right (A>B, p>.5); right (B>A, p<.5); tie -> wrong; p == 0.5 left out; wrong
    assert L.preference_accuracy(r_a, r_b, p_a) == 2 / 4
    assert math.isnan(L.preference_accuracy(r_a[:1], r_b[:1], t([0.5])))


def test_choice_probability_and_clamp_by_hand():
    la, lb = t([-1.0, -3.0]), t([-2.0, -0.5])
    p = L.choice_probability(la, lb)
    close(p, [math.exp(-1) / (math.exp(-1) + math.exp(-2)), math.exp(-3) / (math.exp(-3) + math.exp(-0.5))])
    close(p, torch.softmax(torch.stack([la, lb]), dim=0)[0])
    close(L.clamp_probability(t([0.05, 0.3, 0.45, 0.55, 0.7, 0.99])), [0.4, 0.4, 0.45, 0.55, 0.6, 0.6])
    close(L.clamp_probability(t([0.1, 0.9]), low=0.2, high=0.7), [0.2, 0.7])
    close(L.clamp_probability(0.95), 0.6)
    close(L.choice_probability(-1.0, -2.0), sig(1.0))


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards


def test_kl_penalty_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])  # d = logp - ref = +1, -1
    close(L.kl_penalty(logp, ref, "k1"), [1.0, -1.0])
    close(L.kl_penalty(logp, ref, "abs"), [1.0, 1.0])
    close(L.kl_penalty(logp, ref, "k2"), [0.5, 0.5])
    close(L.kl_penalty(logp, ref, "k3"), [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1])
    with pytest.raises(ValueError, match="k1, abs, k2, k3"):
        L.kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    p = t([0.5, 0.3, 0.2])  # the policy
    q = t([0.2, 0.2, 0.6])  # the reference
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    for kind in ("k1", "k3"):
        expectation = (p * L.kl_penalty(p.log(), q.log(), kind)).sum()  # E over tokens sampled from the policy
        close(expectation, exact)
    assert (L.kl_penalty(p.log(), q.log(), "k3") >= 0).all()


def _reward_case():
    ref = torch.full((3, 4), -1.0, dtype=D)
    d = t([[0.1, -0.2, 0.3, 0.0], [0.5, 0.4, GARBAGE, GARBAGE], [-0.1, 0.2, 0.1, GARBAGE]])
    return t([2.0, -1.0, 0.5]), ref + d, ref


def test_per_token_rewards_by_hand():
    score, logp, ref = _reward_case()
    rewards, kl = L.per_token_rewards(
        score, logp, ref, MASK, beta=0.1, truncated=torch.tensor([True, False, False]), truncation_penalty=-1.0
    )
    close(kl, [[0.1, -0.2, 0.3, 0.0], [0.5, 0.4, 0.0, 0.0], [-0.1, 0.2, 0.1, 0.0]])
    want = [
        [-0.01, 0.02, -0.03, 0.0 + 2.0 - 1.0],  # truncated: score + penalty at the last token
        [-0.05, -0.04 - 1.0, 0.0, 0.0],  # length 2: score at index 1
        [0.01, -0.02, -0.01 + 0.5, 0.0],  # length 3: score at index 2
    ]
    close(rewards, want)
    # no truncation info: plain score
    rewards, _ = L.per_token_rewards(score, logp, ref, MASK, beta=0.1)
    close(rewards[0, 3], 2.0)


def test_per_token_rewards_k3():
    score, logp, ref = _reward_case()
    rewards, kl = L.per_token_rewards(score, logp, ref, MASK, beta=0.5, kl_kind="k3")
    k3 = lambda d: math.exp(-d) - 1 + d  # noqa: E731
    close(kl[1], [k3(0.5), k3(0.4), 0.0, 0.0])
    close(rewards[1], [-0.5 * k3(0.5), -0.5 * k3(0.4) - 1.0, 0.0, 0.0])


def test_per_token_rewards_rejects_an_empty_row():
    score, logp, ref = _reward_case()
    mask = MASK.clone()
    mask[1] = 0
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        L.per_token_rewards(score, logp, ref, mask, beta=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# GAE


def test_gae_by_hand():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]])
    adv, ret = L.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # deltas: 0 + 0.2 - 0.5 = -0.3, 0 + 0.4 - 0.2 = 0.2, 1 + 0 - 0.4 = 0.6 (no value after the end)
    # A2 = 0.6, A1 = 0.2 + 0.5 * 0.6 = 0.5, A0 = -0.3 + 0.5 * 0.5 = -0.05
    close(adv, [[-0.05, 0.5, 0.6]])
    close(ret, [[0.45, 0.7, 1.0]])


def _gae_double_loop(rewards, values, mask, gamma, lam):
    """Straight from the definition: A_t = sum_l (gamma lam)^l delta_{t+l} over the row's real tokens."""
    adv = [[0.0] * len(row) for row in rewards]
    for b, (r, v, m) in enumerate(zip(rewards, values, mask)):
        n = int(sum(m))  # right padding: the first n tokens are real
        for i in range(n):
            total = 0.0
            for k in range(i, n):
                next_v = v[k + 1] if k + 1 < n else 0.0
                total += (gamma * lam) ** (k - i) * (r[k] + gamma * next_v - v[k])
            adv[b][i] = total
    ret = [[(a + v[i]) if m[i] else 0.0 for i, a in enumerate(arow)] for arow, v, m in zip(adv, values, mask)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_double_loop_with_right_padding(gamma, lam):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 4, generator=g, dtype=D)
    values = torch.randn(3, 4, generator=g, dtype=D)
    rewards = torch.where(MASK.bool(), rewards, t(GARBAGE))  # padding garbage must be ignored
    values = torch.where(MASK.bool(), values, t(-GARBAGE))
    adv, ret = L.gae(rewards, values, MASK, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_double_loop(rewards.tolist(), values.tolist(), MASK.tolist(), gamma, lam)
    close(adv, want_adv)
    close(ret, want_ret)
    assert (adv[~MASK.bool()] == 0).all() and (ret[~MASK.bool()] == 0).all()


def test_gae_with_lambda_1_and_gamma_1_gives_reward_to_go_minus_value():
    rewards = t([[0.1, -0.2, 1.5, 0.0], [0.3, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]])
    values = t([[0.4, 0.1, 0.9, 0.0], [1.0, 1.1, 0.0, 0.0], [0.2, -0.3, 0.5, 0.0]])
    adv, ret = L.gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    close(ret, [[1.4, 1.3, 1.5, 0.0], [2.3, 2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    close(adv, ret - values * MASK)


def test_gae_a_gap_inside_a_row_ends_the_episode():
    rewards, values = t([[0.0, 1.0, GARBAGE, 2.0]]), t([[0.5, 0.5, GARBAGE, 0.5]])
    adv, ret = L.gae(rewards, values, t([[1, 1, 0, 1]]), gamma=1.0, lam=1.0)
    # tokens 0-1 form one episode (A1 = 1 - 0.5, A0 = 0 + 0.5 - 0.5 + A1), token 3 another (A3 = 2 - 0.5)
    close(adv, [[0.5, 0.5, 0.0, 1.5]])
    close(ret, [[1.0, 1.0, 0.0, 2.0]])


def test_gae_hole_rules_by_hand():
    rewards, values = t([[0.0, 1.0, GARBAGE, 2.0]]), t([[0.5, 0.5, GARBAGE, 0.5]])
    mask = t([[1, 1, 0, 1]])
    # gamma 1, lam 0.5; A3 = 2 - 0.5 = 1.5 in every rule
    #   end:  the hole stops the recursion: A1 = 1 - 0.5 = 0.5, A0 = 0 + 0.5 - 0.5 + 0.5 * 0.5 = 0.25
    #   zero: r = V = 0 at the hole: A2 = 0 + 0.5 - 0 + 0.5 * 1.5 = 1.25, A1 = 1 + 0 - 0.5 + 0.5 * 1.25 = 1.125,
    #         A0 = 0 + 0.5 - 0.5 + 0.5 * 1.125 = 0.5625
    #   skip: V3 and A3 carried to token 1: A1 = 1 + 0.5 - 0.5 + 0.5 * 1.5 = 1.75, A0 = 0.5 * 1.75 = 0.875
    want = {"end": [0.25, 0.5, 0.0, 1.5], "zero": [0.5625, 1.125, 0.0, 1.5], "skip": [0.875, 1.75, 0.0, 1.5]}
    for hole, adv_want in want.items():
        adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.5, hole=hole)
        close(adv, [adv_want])
        close(ret, [[a + v if m else 0.0 for a, v, m in zip(adv_want, [0.5, 0.5, 0.0, 0.5], [1, 1, 0, 1])]])
    with pytest.raises(ValueError):
        L.gae(rewards, values, mask, hole="continue")


def test_gae_hole_rules_agree_on_right_padding():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    r, v = torch.where(MASK.bool(), r, t(GARBAGE)), torch.where(MASK.bool(), v, t(-GARBAGE))
    ref = L.gae(r, v, MASK, 0.9, 0.8, hole="end")
    for hole in ("zero", "skip"):
        for a, b in zip(L.gae(r, v, MASK, 0.9, 0.8, hole=hole), ref):
            close(a, b)


def test_per_token_rewards_rejects_a_positive_truncation_penalty():
    z = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match="rewards truncated"):
        L.per_token_rewards(t([1.0]), z, z, t([[1, 1]]), 0.1, truncated=torch.tensor([True]), truncation_penalty=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# PPO losses


def test_ppo_policy_loss_and_clipfrac_by_hand():
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 3.0]
    adv = t([[1.0, -1.0, -1.0, 1.0, 2.0, 5.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    old = t([[-1.0, -2.0, -0.5, -3.0, -1.5, -1.0]])
    logp = (old + torch.log(t([ratios]))).requires_grad_(True)
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)):
    #   r 1.5, A  1: max(-1.5, -1.2) = -1.2  clipped
    #   r 1.5, A -1: max( 1.5,  1.2) =  1.5  not clipped (ratio out of range, but the unclipped term binds)
    #   r 0.5, A -1: max( 0.5,  0.8) =  0.8  clipped
    #   r 0.5, A  1: max(-0.5, -0.8) = -0.5  not clipped
    #   r 1.1, A  2: -2.2 both               not clipped
    close(loss.detach(), (-1.2 + 1.5 + 0.8 - 0.5 - 2.2) / 5)
    close(stats["clipfrac"], 2 / 5)
    close(stats["ratio_mean"], (1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5)
    kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 5
    close(stats["approx_kl"], kl)
    assert not stats["clipfrac"].requires_grad
    loss.backward()
    # clipped tokens (and the masked one) get no gradient; others -A r / N
    close(logp.grad, [[0.0, 1.5 / 5, 0.0, -0.5 / 5, -2.2 / 5, 0.0]])


def test_ppo_policy_loss_at_ratio_one():
    logp = t([[-1.0, -2.0, -0.3], [-0.7, GARBAGE, GARBAGE]])
    adv = t([[0.5, -1.5, 2.0], [4.0, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = L.ppo_policy_loss(logp, logp.clone(), adv, mask)
    close(loss, -(0.5 - 1.5 + 2.0 + 4.0) / 4)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


def test_ppo_value_loss_by_hand():
    values = t([[0.5, 0.5, 0.1, GARBAGE]])
    old = t([[0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 0.0, 1.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = L.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # v 0.5 -> clipped 0.2; R 1: max(0.25, 0.64) = 0.64 (clipped binds); R 0: max(0.25, 0.04) = 0.25
    # v 0.1 is inside the range: 0.81 both
    close(loss, 0.5 * (0.64 + 0.25 + 0.81) / 3)
    close(stats["vf_clipfrac"], 1 / 3)


def test_ppo_value_loss_gradient_with_both_clips_active():
    values = t([[0.5, 0.5, 0.1, -0.5, -0.5, GARBAGE]]).requires_grad_(True)
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 0.0, 1.0, -1.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, stats = L.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # v  0.5 -> 0.2 (upper clip); R  1: max(0.25, 0.64) clipped binds, no gradient; R 0: max(0.25, 0.04) unclipped
    # v  0.1 inside the range: 0.81 both
    # v -0.5 -> -0.2 (lower clip); R -1: max(0.25, 0.64) clipped binds, no gradient; R 0: max(0.25, 0.04) unclipped
    close(loss.detach(), 0.5 * (0.64 + 0.25 + 0.81 + 0.64 + 0.25) / 5)
    close(stats["vf_clipfrac"], 2 / 5)
    loss.backward()
    # d/dV of 0.5 * (V - R)^2 / N = (V - R) / N where the unclipped error binds; 0 where the clipped one does
    close(values.grad, [[0.0, 0.5 / 5, (0.1 - 1.0) / 5, 0.0, -0.5 / 5, 0.0]])


# ---------------------------------------------------------------------------------------------------------------------
# group baselines and loss aggregation


def test_group_advantages_by_hand():
    s = t([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    # row 0: mean 3, deviations -2, -1, 3; sum of squares 14: unbiased std sqrt(7), biased sqrt(14 / 3)
    close(L.group_advantages(s, eps=0.0)[0], [-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7)])
    close(L.group_advantages(s, scale="std_biased", eps=0.0)[0], [d / math.sqrt(14 / 3) for d in (-2, -1, 3)])
    close(L.group_advantages(s, scale="none"), [[-2.0, -1.0, 3.0], [0.0, 0.0, 0.0]])
    # leave-one-out: b_i = (9 - s_i) / 2 = 4, 3.5, 1.5
    close(L.group_advantages(s, baseline="leave_one_out", scale="none")[0], [-3.0, -1.5, 4.5])
    close(L.group_advantages(s, eps=1e-6)[1], [0.0, 0.0, 0.0])  # no spread: 0 / (0 + eps)
    close(L.group_advantages(t([[5.0], [-2.0]])), [[0.0], [0.0]])  # one sample: nothing to compare with
    with pytest.raises(ValueError):
        L.group_advantages(t([[5.0]]), baseline="leave_one_out")
    with pytest.raises(ValueError):
        L.group_advantages(s, scale="mad")


def test_aggregate_loss_modes_by_hand():
    x = t([[1.0, 2.0, GARBAGE], [4.0, GARBAGE, GARBAGE], [GARBAGE, GARBAGE, GARBAGE]])
    m = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(L.aggregate_loss(x, m), (1 + 2 + 4) / 3)
    close(L.aggregate_loss(x, m, "seq-mean-token-mean"), (1.5 + 4) / 2)  # the empty row does not count
    close(L.aggregate_loss(x, m, "seq-mean-token-sum"), (3 + 4) / 2)
    close(L.aggregate_loss(x, m, "seq-mean-token-sum-norm", constant=9.0), 7 / 9)
    close(L.aggregate_loss(x, m, "token-sum"), 7.0)
    close(L.aggregate_loss(x, m, global_tokens=10.0), 7 / 10)
    with pytest.raises(ValueError):
        L.aggregate_loss(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        L.aggregate_loss(x, m, "seq-mean-token-mean", global_tokens=3.0)
    with pytest.raises(ValueError):
        L.aggregate_loss(x, m, "sequence-mean")


def test_global_token_mean_is_invariant_to_the_micro_batch_split():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, dtype=D)
    m = t([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    whole = L.aggregate_loss(x, m)
    n = float(m.sum())
    for split in ([2, 2], [1, 3], [3, 1]):
        parts = zip(x.split(split), m.split(split))
        close(sum(L.aggregate_loss(xp, mp, global_tokens=n) for xp, mp in parts), whole)
    # the micro-batch-local token mean is not: averaging [1, 3]-split means weights the rows differently
    local = sum(L.aggregate_loss(xp, mp) for xp, mp in zip(x.split([1, 3]), m.split([1, 3]))) / 2
    assert abs(float(local - whole)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = L.AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert ctl.beta == 0.1
    ctl.update(9.0, 256)  # error (9 - 6) / 6 = 0.5 -> clipped to 0.2
    beta = 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.beta == pytest.approx(beta, rel=1e-14)
    ctl.update(6.6, 256)  # error 0.1
    beta *= 1 + 0.1 * 256 / 10000
    assert ctl.beta == pytest.approx(beta, rel=1e-14)
    ctl.update(torch.tensor(0.0), 512)  # error -1 -> clipped to -0.2
    beta *= 1 - 0.2 * 512 / 10000
    assert ctl.beta == pytest.approx(beta, rel=1e-14)
    ctl.update(6.0, 1000)  # on target: unchanged
    assert ctl.beta == pytest.approx(beta, rel=1e-14)


def test_fixed_kl_controller():
    ctl = L.FixedKLController(beta=0.05)
    ctl.update(100.0, 512)
    assert ctl.beta == 0.05


def test_temper_divides_by_the_temperature_and_leaves_temperature_1_alone():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(L.temper(logits, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    assert L.temper(logits, 1.0) is logits  # no pass over the logits at all
