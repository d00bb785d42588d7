"""GRPO / RLOO in RL-CAI (minicai/grpo.py; train_rl.py --advantage grpo|rloo): group advantages,
loss aggregation, the exact first step, learning, the script end to end."""

import copy
import json
import math

import pytest
import torch
from test_ppo import (
    OPENING,
    PROMPTS,
    STOP,
    import_train_rl,
    assert_reward_rose_with_bounded_kl,
    learn_programmatic_reward,
    make_models,
    record_forward_passes,
    tiny_pm_and_prompts,
)

from minicai import MinicaiError, grpo, ppo
from minicai import losses as L
from minicai.model import random_model, tiny_config


def loop_group_advantages(scores: list[list[float]], baseline: str, scale: str, eps: float) -> list[list[float]]:
    """The definition, one group and one sample at a time in Python floats (float64)."""
    out = []
    for row in scores:
        G = len(row)
        if len(set(row)) == 1:  # all equal: no signal
            out.append([0.0] * G)
            continue
        mean = sum(row) / G
        if baseline == "mean":
            base = [mean] * G
        else:
            base = [sum(row[j] for j in range(G) if j != i) / (G - 1) for i in range(G)]
        if scale == "none":
            out.append([s - b for s, b in zip(row, base)])
            continue
        sd = math.sqrt(sum((s - mean) ** 2 for s in row) / (G - 1 if scale == "std" else G))
        out.append([(s - b) / (sd + eps) for s, b in zip(row, base)])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("baseline,scale", [("mean", "std"), ("mean", "std_biased"), ("mean", "none"),
                                            ("leave_one_out", "none"), ("leave_one_out", "std")])
def test_group_advantages_equal_a_plain_loop(baseline, scale, dtype):
    """Random groups of G = 2..8, and groups whose rewards are all equal (any value: 0.1, 1/3, -2.7 are not sums of
    powers of two, so the group mean is rounded): those get advantage exactly 0, never nan."""
    g = torch.Generator().manual_seed(0)
    for G in (2, 3, 4, 5, 8):
        s = (torch.randn(6, G, generator=g, dtype=torch.float64) * 3).to(dtype)
        for i, v in enumerate((0.1, 1 / 3, -2.7)):
            s[2 * i] = v  # rows 0, 2, 4: all equal
        got = L.group_advantages(s, baseline, scale, eps=1e-6)
        want = torch.tensor(loop_group_advantages(s.double().tolist(), baseline, scale, 1e-6), dtype=torch.float64)
        assert got.dtype == dtype and not got.isnan().any()
        assert torch.equal(got[[0, 2, 4]], torch.zeros(3, G, dtype=dtype)), (G, got[[0, 2, 4]])
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (G, got, want)
    # the baselines differ as they should: RLOO = G / (G - 1) * (s - mean)
    s = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    assert torch.allclose(L.group_advantages(s, "leave_one_out", "none"), 1.5 * L.group_advantages(s, "mean", "none"))


# ---------------------------------------------------------------------------------------------------------------------
# The group rollout and update (tiny random models; the setup and reward of tests/test_ppo.py)

GROUP_PROMPTS = PROMPTS[:4]  # 1..9 tokens: left padding differs per group


def spread_reward(prompts, responses):
    """A reward with spread inside most groups: the length plus a tenth per low token id."""
    return torch.tensor([len(r) + 0.1 * sum(t < 64 for t in r) for r in responses], dtype=torch.float32)


def group_state(advantage="grpo", dtype=torch.float32, ref_seed=None, G=3, prompts=GROUP_PROMPTS, **overrides):
    """Policy (and a reference equal to it, or another random model with ref_seed), no value model."""
    policy, ref, _ = make_models(dtype=dtype)
    if ref_seed is not None:
        ref = random_model(tiny_config(vocab_size=128), seed=ref_seed, dtype=dtype)
    settings = dict(batch_size=len(prompts) * G, minibatch_size=6, max_new_tokens=10, advantage=advantage,
                    group_size=G, truncation_penalty=-1.0, policy_lr=1e-2)
    cfg = ppo.PPOConfig(**{**settings, **overrides})
    return ppo.init_state(policy, ref, None, cfg), cfg


def group_rollout(state, cfg, prompts=GROUP_PROMPTS, reward=spread_reward):
    return grpo.group_rollout(state.policy, state.ref_model, prompts, [str(p) for p in prompts], reward, cfg,
                             stop_ids=STOP, pad_id=0, seed=16)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
@pytest.mark.parametrize("micro,forward", [(None, 16), (2, 16), (4, 1)], ids=["whole", "micro2", "micro4-pass1"])
@pytest.mark.parametrize("shared", [False, True], ids=["no_prefix", "shared_prefix"])
def test_ratio_is_one_and_kl_zero_before_the_first_update(advantage, kl_in, micro, forward, shared):
    prompts = [OPENING + p for p in GROUP_PROMPTS] if shared else GROUP_PROMPTS
    state, cfg = group_state(advantage, kl_in=kl_in, micro_batch_size=micro, forward_batch_size=forward,
                             prompts=prompts)
    ro, stats = grpo.group_iteration(state, prompts, [str(p) for p in prompts], spread_reward, cfg, stop_ids=STOP,
                                     seed=3)
    assert state.value_model is None and state.value_opt is None and ro.values is None
    assert ro.prefix_ids.numel() == (len(OPENING) if shared else 0)
    assert stats["ratio_first_maxdev"] == 0.0 and stats["kl_max_abs"] == 0.0 and stats["kl"] == 0.0
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl)) and ro.response_mask.sum(1).unique().numel() >= 3
    assert stats["advantage_abs_mean"] > 0 and stats["policy_grad_norm"] > 0  # there was something to learn
    assert "value_mean" not in stats and "value_loss" not in stats
    assert state.iteration == 1


def test_rollout_rows_are_groups_and_the_first_pass_is_the_first_micro_batch(monkeypatch):
    calls = record_forward_passes(monkeypatch, ppo, grpo)  # the rollout's passes (ppo.py), the update's (grpo.py)
    state, cfg = group_state(micro_batch_size=2, forward_batch_size=4)
    ro, _ = grpo.group_iteration(state, GROUP_PROMPTS, ["a", "b", "c", "d"], spread_reward, cfg, stop_ids=STOP)
    rollout_passes = [n for model, n in calls[:8] if model == id(state.policy)]
    assert rollout_passes == [2, 4, 4, 2]  # 12 rows: the first micro-batch alone, then passes of 4
    assert [n for _, n in calls[8:]] == [2, 2, 2] * 2 * cfg.ppo_epochs  # update: micro-batches of 2
    assert ro.prompts == [q for q in "abcd" for _ in range(3)]
    P = ro.query_ids.shape[1]
    for i, p in enumerate(GROUP_PROMPTS):  # rows 3i .. 3i+2 answer prompt i
        for r in range(3 * i, 3 * i + 3):
            assert ro.query_ids[r, P - len(p):].tolist() == p and ro.query_mask[r].sum() == len(p)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_rewards_and_advantages_by_hand(advantage, kl_in, estimator):
    """R = score (+ truncation penalty) - beta * sum_t KL_t (KL in the reward; with the KL in the loss, R = score and
    KL_t is k3 whatever --kl-estimator says), grouped by prompt, against the plain-loop advantages, on every token of
    the row and 0 on padding. The reference is another model (KL != 0)."""
    state, cfg = group_state(advantage, dtype=torch.float64, ref_seed=1, kl_in=kl_in, kl_estimator=estimator)
    ro = group_rollout(state, cfg)
    beta, G = 0.1, cfg.group_size
    grpo.compute_group_advantages(ro, beta, cfg)
    R = []
    for i in range(len(ro.scores)):
        n = int(ro.response_mask[i].sum())
        d = (ro.logprobs[i, :n] - ro.ref_logprobs[i, :n]).double()
        k = d if (estimator == "k1" and kl_in == "reward") else torch.exp(-d) - 1 + d
        assert torch.allclose(ro.kl[i, :n].double(), k, atol=1e-12, rtol=0)
        score = float(ro.scores[i]) + (0.0 if ro.finished[i] else cfg.truncation_penalty)
        R.append(score - (beta * float(k.sum()) if kl_in == "reward" else 0.0))
    assert (ro.logprobs - ro.ref_logprobs).abs().max() > 0.1 and (~ro.finished).any()  # KL != 0, truncations
    scale = "std" if advantage == "grpo" else "none"
    baseline = "mean" if advantage == "grpo" else "leave_one_out"
    want = loop_group_advantages([R[j : j + G] for j in range(0, len(R), G)], baseline, scale, 1e-6)
    want = torch.tensor([a for group in want for a in group], dtype=torch.float64)  # [B]
    m = ro.response_mask.bool()
    assert torch.allclose(ro.advantages, torch.where(m, want[:, None], 0.0), atol=1e-9, rtol=0)
    assert (ro.advantages[~m] == 0).all() and ro.returns is None


def test_a_group_without_spread_gets_no_advantage():
    state, cfg = group_state(micro_batch_size=3)
    ro = group_rollout(state, cfg, reward=lambda prompts, responses: torch.full((len(responses),), 0.1))
    ro.finished[:] = True  # no truncation penalty either: every R is 0.1
    grpo.compute_group_advantages(ro, 0.1, cfg)
    stats = grpo.group_stats(ro, cfg)
    assert torch.equal(ro.advantages, torch.zeros_like(ro.advantages)) and stats["groups_without_signal"] == 1.0
    before = copy.deepcopy(state.policy.state_dict())
    step = grpo.grpo_step(state.policy, state.policy_opt, ro, cfg)
    assert step["policy_grad_norm"] == 0.0 and step["policy_loss"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in state.policy.state_dict().items())  # AdamW: no decay, no step


def test_group_token_loss_is_the_ppo_surrogate_plus_beta_k3():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3  # some ratios outside 1 +- 0.2
    ref = logp + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    surrogate = grpo.group_token_loss(logp, old, ref, adv, clip=0.2)
    # token-mean of the surrogate is losses.ppo_policy_loss, exactly
    assert torch.equal(L.aggregate_loss(surrogate, mask, "token-mean"), L.ppo_policy_loss(logp, old, adv, mask)[0])
    # the KL term: beta * (pi_ref / pi - log(pi_ref / pi) - 1) >= 0, Shao et al. eq. 4
    with_kl = grpo.group_token_loss(logp, old, ref, adv, clip=0.2, kl_coef=0.04)
    ratio_ref = torch.exp(ref - logp)
    assert torch.allclose(with_kl - surrogate, 0.04 * (ratio_ref - torch.log(ratio_ref) - 1), atol=1e-15, rtol=0)
    assert (with_kl >= surrogate).all()
    # its gradient pulls log pi toward log pi_ref
    x = logp.clone().requires_grad_(True)
    grpo.group_token_loss(x, x.detach(), ref, torch.zeros_like(adv), clip=0.2, kl_coef=1.0).sum().backward()
    assert (torch.sign(-x.grad) == torch.sign(ref - logp)).all()


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_step_first_loss_by_hand(kl_in):
    """At the first step the ratio is 1, so the token-mean loss is -mean(A) over the tokens, plus beta * mean k3 of
    the policy against the reference when the KL is in the loss (and only then: in the reward it is already in A)."""
    state, cfg = group_state(dtype=torch.float64, ref_seed=1, kl_in=kl_in, minibatch_size=12, ppo_epochs=1)
    ro = group_rollout(state, cfg)
    beta = 0.5
    grpo.compute_group_advantages(ro, beta, cfg)
    stats = grpo.grpo_step(state.policy, state.policy_opt, ro, cfg)
    m = ro.response_mask.bool()
    d = ro.logprobs - ro.ref_logprobs
    want = -float(ro.advantages[m].mean()) + (beta * float((torch.exp(-d) - 1 + d)[m].mean()) if kl_in == "loss"
                                              else 0.0)
    assert stats["ratio_first_maxdev"] == 0.0 and float(d[m].abs().max()) > 0.1
    assert stats["policy_loss"] == pytest.approx(want, abs=1e-12)


SPLITS = [[4], [1, 3], [2, 2], [3, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_micro_batch_losses_add_up_to_the_minibatch_loss(mode):
    """However a minibatch is split into micro-batches, their losses add up to the minibatch's loss in each mode;
    the control: token-mean as a plain mean of the micro-batches' own token means depends on the split."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    rows, tokens, max_len = 4, int(mask.sum()), 6
    whole = L.aggregate_loss(per_token, mask, mode, constant=rows * max_len if mode.endswith("norm") else None)
    for split in SPLITS:
        bounds = [sum(split[:i]) for i in range(len(split) + 1)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        total = sum(grpo.micro_batch_loss(per_token[s], mask[s], mode, rows, tokens, max_len) for s in parts)
        assert torch.allclose(total, whole, atol=1e-14, rtol=0), (mode, split)
        naive = sum(L.aggregate_loss(per_token[s], mask[s], "token-mean") for s in parts) / len(parts)
        if mode == "token-mean" and len(split) > 1:
            assert not torch.allclose(naive, whole, atol=1e-3)


def test_aggregation_modes_weigh_lengths_as_documented():
    """One long and one short response, the same per-token loss 1: token-mean and the Dr. GRPO constant weigh every
    token alike, seq-mean-token-mean weighs the short response's tokens more (the length bias)."""
    mask = torch.tensor([[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])
    x = torch.ones(2, 8, dtype=torch.float64, requires_grad=True)
    for mode, want in [("token-mean", (1 / 10, 1 / 10)), ("seq-mean-token-mean", (1 / 16, 1 / 4)),
                       ("seq-mean-token-sum", (1 / 2, 1 / 2)), ("seq-mean-token-sum-norm", (1 / 16, 1 / 16))]:
        x.grad = None
        grpo.micro_batch_loss(x, mask, mode, batch_rows=2, batch_tokens=10, max_len=8).backward()
        assert x.grad[0, 0].item() == pytest.approx(want[0]) and x.grad[1, 0].item() == pytest.approx(want[1])


@pytest.mark.parametrize("mode", L.AGG_MODES)
def test_grpo_step_does_not_depend_on_the_micro_batch_split(mode):
    """One update of a float64 policy with minibatches of 6 rows taken whole, or as micro-batches of 1 and 4 rows:
    the same weights afterwards (gradient accumulation with the minibatch's normaliser)."""
    results = []
    for micro in (None, 1, 4):
        state, cfg = group_state(dtype=torch.float64, ref_seed=1, kl_in="loss", loss_agg=mode, micro_batch_size=micro,
                                 ppo_epochs=1)
        ro = group_rollout(state, cfg)
        grpo.compute_group_advantages(ro, 0.1, cfg)
        stats = grpo.grpo_step(state.policy, state.policy_opt, ro, cfg)
        results.append((state.policy.lm_head.weight.detach().clone(), stats))
    initial = make_models(dtype=torch.float64)[0].lm_head.weight
    (w0, s0), *rest = results
    assert not torch.allclose(w0, initial, atol=1e-4)
    for w, s in rest:
        assert torch.allclose(w, w0, atol=1e-10, rtol=0)
        assert s["policy_loss"] == pytest.approx(s0["policy_loss"], abs=1e-10)
        assert s["ref_kl_k3"] == pytest.approx(s0["ref_kl_k3"], abs=1e-10)


@pytest.mark.parametrize("advantage,kl_in", [("grpo", "reward"), ("rloo", "reward"), ("grpo", "loss")])
def test_group_advantages_learn_a_programmatic_reward_with_bounded_kl(advantage, kl_in):
    """tests/test_ppo.py's learning test (+1 per target token, vocab 32, 8 tokens, the adaptive KL controller),
    with 16 responses per iteration as 4 prompts x 4 samples and no value model. Measured for seeds 0-3 on the
    reference model path: the score rises by 1.9-4.8 in every run, and the mean KL of the last 10 iterations stays
    under 2.5x the target (at most 13.3 nats, GRPO with the KL in the loss, seed 0). The control: without a KL
    penalty (kl_coef 0) the same runs end at 20-28 nats, so the bound fails when the penalty does not act."""
    vocab, target, iterations = 32, 7, 40
    policy, ref, _ = make_models(vocab=vocab)
    cfg = ppo.PPOConfig(batch_size=16, max_new_tokens=8, ppo_epochs=4, minibatch_size=8, policy_lr=3e-3,
                        kl_coef=0.3, kl_target=6.0, kl_horizon=32, advantage=advantage, group_size=4, kl_in=kl_in)
    state = ppo.init_state(policy, ref, None, cfg)
    history = learn_programmatic_reward(state, cfg, grpo.group_iteration, 4, vocab, target, iterations)
    assert_reward_rose_with_bounded_kl(history, 2.5 * cfg.kl_target)


def test_group_settings_are_checked():
    for bad, match in [(dict(group_size=3), "group_size=3 with batch_size=8"), (dict(group_size=1, batch_size=2),
                       "group_size=1"), (dict(kl_in="both"), "kl_in"), (dict(loss_agg="sum"), "loss_agg"),
                       (dict(group_scale="mad"), "group_scale"), (dict(micro_batch_size=5), "micro_batch_size=5"),
                       (dict(advantage="ppo"), "advantage='ppo'")]:
        with pytest.raises(MinicaiError, match=match):
            ppo.PPOConfig(**{"batch_size": 8, "minibatch_size": 4, "advantage": "grpo", **bad})
    ppo.PPOConfig(batch_size=8, group_size=3)  # gae ignores the group settings


# ---------------------------------------------------------------------------------------------------------------------
# train_rl.py --advantage grpo|rloo end to end (tiny model)


def tiny_run_args(tiny_model_dir, tmp_path):
    pm_dir, red, helpful = tiny_pm_and_prompts(tiny_model_dir, tmp_path)
    return ["--model", str(tiny_model_dir), "--pm", str(pm_dir), "--red-team-prompts", str(red),
            "--helpful-prompts", str(helpful), "--batch-size", "8", "--group-size", "4", "--minibatch-size", "4",
            "--max-new-tokens", "6", "--ppo-epochs", "1", "--save-every", "1", "--threads", "1", "--device", "cpu",
            "--policy-lr", "1e-3", "--samples", "4"]


@pytest.mark.parametrize("advantage,extra", [("grpo", ["--kl-in", "loss", "--loss-agg", "seq-mean-token-mean"]),
                                             ("rloo", ["--micro-batch-size", "2"])])
def test_train_rl_runs_and_resumes_with_group_advantages(tiny_model_dir, tmp_path, advantage, extra, capsys):
    train_rl = import_train_rl()
    from minicai.model import Transformer

    out = tmp_path / "rl"
    argv = tiny_run_args(tiny_model_dir, tmp_path) + ["--out", str(out), "--advantage", advantage] + extra
    train_rl.main(argv + ["--iterations", "2"])
    text = capsys.readouterr().out
    assert f"value model: none ({advantage}" in text
    assert "check before the first update: max |ratio - 1| = 0, max |log pi - log pi_ref| = 0" in text
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[0]["kl"] == 0.0 and metrics[0]["ratio_first_maxdev"] == 0.0
    for key in ("score", "kl", "beta", "policy_loss", "ref_kl_k3", "clipfrac", "entropy", "response_length",
                "reward_group_std", "groups_without_signal", "score_red_team", "score_helpful", "rollout_s"):
        assert key in metrics[0], key
    assert "value_loss" not in metrics[0] and "value_mean" not in metrics[0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and len({s["prompt"] for s in samples[:4]}) == 1  # the first 4 rows: one group
    ckpt = ppo.latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "iter_000002" and not (ckpt / "value").exists()
    Transformer.from_pretrained(out / "model")
    train_rl.main(argv + ["--iterations", "3"])  # resumes at iteration 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    # a PPO run cannot resume a checkpoint without a value model
    gae_argv = [a for a in argv if a != advantage and a != "--advantage"] + ["--iterations", "4"]
    with pytest.raises(MinicaiError, match=f"made with other settings \\(--advantage: '{advantage}' -> 'gae'\\)"):
        train_rl.main(gae_argv)  # the run folder's settings record says so first
    (out / "settings.json").unlink()  # without it (a folder from before settings records), the checkpoint says so
    with pytest.raises(MinicaiError, match="written by a run with --advantage grpo/rloo"):
        train_rl.main(gae_argv)


def test_train_rl_group_flags_in_help(capsys):
    train_rl = import_train_rl()
    with pytest.raises(SystemExit):
        train_rl.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--advantage", "--group-size", "--group-scale", "--kl-in", "--loss-agg", "--micro-batch-size"):
        assert flag in text
    assert "length bias" in text and "Liu et al. 2025" in text
    assert "initial policy and frozen reference: the SL-CAI model (HF layout); 'default' for the base model " \
           "(default: runs/sl/model)" in text and train_rl.parse_args([]).model == "runs/sl/model"
