"""Specification of minicai/oracle: named conventions, their reference math, golden vectors and the dump checker."""

import math

import pytest
import torch

from minicai import losses as L
from minicai.oracle import AXIS_FIELDS, PROFILES, diff, get
from minicai.oracle import reference as R

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------------
# conventions


def test_the_seven_profiles_exist_and_cite_a_source_for_every_axis():
    assert set(PROFILES) >= {"minicai", "lm-human-preferences", "trl-ppo", "trl-ppo-0.11", "openrlhf", "verl",
                             "deepspeed-chat"}
    for conv in PROFILES.values():
        assert conv.versions
        missing = [axis for axis in AXIS_FIELDS if not conv.sources.get(axis)]
        assert not missing, f"{conv.name} cites nothing for {missing}"
        for axis, src in conv.sources.items():
            assert axis in AXIS_FIELDS, f"{conv.name} cites an unknown axis {axis}"
            if conv.name != "minicai":
                assert "@" in src and ":" in src, f"{conv.name}.{axis}: {src!r} is not repo@commit:path:line"


def test_profiles_are_frozen_and_reject_unknown_values():
    conv = get("minicai")
    with pytest.raises(Exception):
        conv.gae_hole = "skip"
    with pytest.raises(ValueError, match="gae_hole"):
        type(conv)(**{**{f: getattr(conv, f) for f in ("name", "framework", "versions", *AXIS_FIELDS)},
                      "gae_hole": "continue"})
    with pytest.raises(ValueError, match="known"):
        get("trl")


def test_trl_differs_from_minicai_on_the_documented_axes():
    axes = {axis for axis, _, _ in diff(get("minicai"), get("trl-ppo"))}
    assert {"score_position", "value_extra", "value_mask", "logprob_temperature", "missing_eos"} <= axes
    assert "whiten_var" not in axes  # both unbiased


def test_kl_names_map_to_minicai_kinds_and_verl_plus_names_work():
    assert get("verl").kl_kind("low_var_kl+") == "k3"
    assert get("trl-ppo-0.11").kl_kind("mse") == "k2"
    with pytest.raises(ValueError, match="advertises"):
        get("trl-ppo").kl_kind("k2")


# ---------------------------------------------------------------------------------------------------------------------
# reference math: the minicai profile is losses.py


def _batch(seed=0, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])[:B, :T]
    r = lambda: torch.randn(B, T, generator=g, dtype=D)  # noqa: E731
    return mask, r(), r(), r(), r()


def test_minicai_profile_reproduces_losses_py():
    conv = get("minicai")
    mask, logp, ref, values, adv = _batch()
    score = t([1.0, -2.0, 0.5])
    kl = R.kl(conv, logp, ref, "k3")
    rewards = R.token_rewards(conv, score, kl, mask, 0.1)
    want_r, want_kl = L.per_token_rewards(score, logp, ref, mask, 0.1, "k3")
    close(rewards, want_r)
    close(kl * mask, want_kl)
    for a, b in zip(R.advantages(conv, rewards, values, mask, 1.0, 0.95), L.gae(want_r, values, mask, 1.0, 0.95)):
        close(a, b)
    close(R.whiten(conv, adv, mask), L.whiten(adv, mask))
    old = logp + 0.3 * adv
    per_tok, _ = R.policy_loss_tokens(conv, logp, old, adv, mask)
    close(R.aggregate(conv, per_tok, mask), L.ppo_policy_loss(logp, old, adv, mask)[0])
    close(R.value_loss(conv, values, ref, adv, mask), L.ppo_value_loss(values, ref, adv, mask, 0.2)[0])


def test_verl_dual_clip_and_trl_score_slot():
    per_tok, _ = R.policy_loss_tokens(get("verl"), t([[math.log(4.0)]]), t([[0.0]]), t([[-1.0]]), t([[1]]))
    close(per_tok, [[3.0]])  # min(max(4, 1.2), 3): dual-clip caps -A * ratio at -A * c
    per_tok, _ = R.policy_loss_tokens(get("minicai"), t([[math.log(4.0)]]), t([[0.0]]), t([[-1.0]]), t([[1]]))
    close(per_tok, [[4.0]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert R.score_slot(get("trl-ppo"), mask).tolist() == [2, 3]  # after EOS, or the last token when full
    assert R.score_slot(get("minicai"), mask).tolist() == [1, 3]
    assert R.score_slot(get("lm-human-preferences"), mask).tolist() == [3, 3]
