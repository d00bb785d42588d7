"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on AI-labelled pairs: the formulas in minicai/losses.py against
numbers worked out by hand in float64, then DPO learning on a tiny model, then train_dpo.py end to end."""

import math

import pytest
import torch

from minicai import losses as L

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


# Three pairs of sequence log-probs. h = (logp_a - ref_a) - (logp_b - ref_b) = 2, -2, 1.
LOGP_A, LOGP_B = [-3.0, -10.0, -7.0], [-5.0, -2.0, -6.0]
REF_A, REF_B = [-4.0, -9.0, -7.5], [-4.0, -3.0, -5.5]
H = [2.0, -2.0, 1.0]
BETA = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# the formulas


def test_log_ratio_difference_and_implicit_rewards_by_hand():
    close(L.dpo_log_ratio_difference(t(LOGP_A), t(LOGP_B), t(REF_A), t(REF_B)), H)
    close(L.dpo_implicit_rewards(t(LOGP_A), t(REF_A), BETA), [0.5, -0.5, 0.25])  # beta (logp - ref)
    close(L.dpo_implicit_rewards(t(LOGP_B), t(REF_B), BETA), [-0.5, 0.5, -0.25])
    # their difference is beta * h
    r_a = L.dpo_implicit_rewards(t(LOGP_A), t(REF_A), BETA)
    r_b = L.dpo_implicit_rewards(t(LOGP_B), t(REF_B), BETA)
    close(r_a - r_b, [BETA * h for h in H])


def test_dpo_loss_and_gradient_by_hand():
    logp_a = t(LOGP_A).requires_grad_(True)
    logp_b = t(LOGP_B).requires_grad_(True)
    p = [1.0, 0.75, 0.0]  # a hard label for A, a soft one, a hard label for B
    loss = L.dpo_loss(logp_a, logp_b, t(REF_A), t(REF_B), t(p), BETA)
    # beta h = 1, -1, 0.5; -log sigmoid(x) = softplus(-x)
    l0 = softplus(-1.0)
    l1 = 0.75 * softplus(1.0) + 0.25 * softplus(-1.0)
    l2 = softplus(0.5)  # p = 0: -log sigmoid(-0.5)
    close(loss.detach(), (l0 + l1 + l2) / 3)
    loss.backward()
    # d/d logp_a of -[p log s(beta h) + (1-p) log s(-beta h)] = beta (s(beta h) - p); the mean divides by 3
    grad_a = [BETA * (sig(BETA * h) - pi) / 3 for h, pi in zip(H, p)]
    close(logp_a.grad, grad_a)
    close(logp_b.grad, [-g for g in grad_a])


def test_hard_label_is_equation_7():
    """p = 1: -log sigmoid(beta h), eq. 7 with A the chosen response; p = 0 is the same with A and B swapped."""
    a, b, ra, rb = t(LOGP_A), t(LOGP_B), t(REF_A), t(REF_B)
    close(L.dpo_loss(a, b, ra, rb, t([1.0] * 3), BETA), sum(softplus(-BETA * h) for h in H) / 3)
    close(L.dpo_loss(a, b, ra, rb, t([0.0] * 3), BETA), L.dpo_loss(b, a, rb, ra, t([1.0] * 3), BETA))


def test_label_smoothing_is_conservative_dpo_and_moves_soft_labels_toward_half():
    a, b, ra, rb = t(LOGP_A[:1]), t(LOGP_B[:1]), t(REF_A[:1]), t(REF_B[:1])  # beta h = 1
    eps = 0.1
    # a hard label with eps: -(1 - eps) log s(beta h) - eps log s(-beta h)
    close(L.dpo_loss(a, b, ra, rb, t([1.0]), BETA, label_smoothing=eps), 0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    # a soft label 0.75 with eps = 0.1 becomes 0.1 + 0.8 * 0.75 = 0.7
    close(L.dpo_loss(a, b, ra, rb, t([0.75]), BETA, label_smoothing=eps),
          L.dpo_loss(a, b, ra, rb, t([0.7]), BETA))
    # eps = 0.5 erases every label: A-better and B-better give the same loss
    close(L.dpo_loss(a, b, ra, rb, t([1.0]), BETA, label_smoothing=0.5),
          L.dpo_loss(a, b, ra, rb, t([0.0]), BETA, label_smoothing=0.5))


def test_dpo_loss_is_bradley_terry_on_the_implicit_rewards():
    """The same loss as the paper's PM (sec. 4.1), with beta * log(pi / pi_ref) in place of the PM's score."""
    p = t([0.9, 0.3, 0.55])
    r_a = L.dpo_implicit_rewards(t(LOGP_A), t(REF_A), BETA)
    r_b = L.dpo_implicit_rewards(t(LOGP_B), t(REF_B), BETA)
    close(L.dpo_loss(t(LOGP_A), t(LOGP_B), t(REF_A), t(REF_B), p, BETA), L.bradley_terry_loss(r_a, r_b, p))


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    x, y = t([-3.0, -8.0]), t([-4.0, -1.0])
    close(L.dpo_loss(x, y, x, y, t([1.0, 0.2]), 0.1), math.log(2))
    close(L.dpo_implicit_rewards(x, x, 0.1), [0.0, 0.0])


def test_soft_label_minimum_is_finite():
    """With p = 0.75 the gradient vanishes at sigmoid(beta h) = 0.75, i.e. beta h = log 3 (hard labels have no
    minimum: their loss keeps falling as h grows)."""
    beta = 0.2
    logp_a = t([math.log(3) / beta - 1.0]).requires_grad_(True)  # h = log(3) / beta with the refs below
    L.dpo_loss(logp_a, t([-2.0]), t([-1.0]), t([-2.0]), t([0.75]), beta).backward()
    close(logp_a.grad, [0.0])
    logp_a.grad = None
    L.dpo_loss(logp_a, t([-2.0]), t([-1.0]), t([-2.0]), t([1.0]), beta).backward()
    assert float(logp_a.grad) < 0  # a hard label still pushes A up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_loss_is_stable_for_large_log_ratios(dtype):
    """|beta h| = 1000: a naive log(sigmoid(x)) gives inf; logsigmoid gives the exact linear tail."""
    logp_a = t([-1000.0, 0.0], dtype).requires_grad_(True)
    logp_b = t([0.0, -1000.0], dtype)
    ref = t([0.0, 0.0], dtype)
    loss = L.dpo_loss(logp_a, logp_b, ref, ref, t([1.0, 1.0], dtype), beta=1.0)
    assert torch.isfinite(loss)
    close(loss.double(), (1000.0 + 0.0) / 2, tol=1e-5)  # -log s(-1000) = 1000, -log s(1000) = 0
    loss.backward()
    assert torch.isfinite(logp_a.grad).all()
    close(logp_a.grad.double(), [-0.5, 0.0], tol=1e-6)  # beta (s(beta h) - p) / B


def test_reward_margin_and_accuracy_by_hand():
    r_a = L.dpo_implicit_rewards(t(LOGP_A), t(REF_A), BETA)  # [0.5, -0.5, 0.25]
    r_b = L.dpo_implicit_rewards(t(LOGP_B), t(REF_B), BETA)  # [-0.5, 0.5, -0.25]
    p = t([0.8, 0.4, 0.5])  # A better (agrees: margin +1); B better (agrees: +1); undecided (left out)
    assert L.reward_margin(r_a, r_b, p) == pytest.approx(1.0, abs=1e-15)
    assert L.preference_accuracy(r_a, r_b, p) == 1.0
    p = t([0.2, 0.4, 0.9])  # B better (disagrees: -1); B better (agrees: +1); A better (agrees: +0.5)
    assert L.reward_margin(r_a, r_b, p) == pytest.approx((-1 + 1 + 0.5) / 3, abs=1e-15)
    assert L.preference_accuracy(r_a, r_b, p) == pytest.approx(2 / 3)
    assert math.isnan(L.reward_margin(r_a, r_b, t([0.5, 0.5, 0.5])))


def test_bad_arguments_raise():
    x = t([0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        L.dpo_loss(x, x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(x, x, x, x, x, beta=0.1, label_smoothing=0.6)
    with pytest.raises(ValueError, match="shape"):
        L.dpo_loss(x, x, x, t([0.0]), x, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        L.dpo_loss(x, x, x, x, t([1.0]), beta=0.1)
