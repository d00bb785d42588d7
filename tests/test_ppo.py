"""RL-CAI's PPO loop (minicai/ppo.py, train_rl.py): padding/positions, learning, checkpoint/resume, wiring."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from minicai import ppo
from minicai.model import random_model, tiny_config
from minicai.reward import RewardModel


def make_models(vocab=128, seed=0, dtype=torch.float32):
    policy = random_model(tiny_config(vocab_size=vocab), seed=seed, dtype=dtype)
    ref = copy.deepcopy(policy)
    value = RewardModel.from_lm(copy.deepcopy(policy), head_init="normal", seed=seed)
    return policy, ref, value


def count_reward(target):
    """Programmatic reward: +1 per occurrence of `target` in the response."""
    return lambda prompts, responses: torch.tensor([float(sum(t == target for t in r)) for r in responses])


# Rows of different prompt lengths (1..9 tokens) so left padding differs per row.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20, 21, 22], [23, 24], [25, 26, 27, 28, 29,
           30, 31], [32, 33, 34, 35]]
STOP = list(range(100, 108))  # 8 of 128 ids stop a row: with seed 16, rows stop after 1, 3, 5, 7, 9 tokens or run out


# The same prompts behind a common opening (as a chat template's system message): the rollout computes it once.
OPENING = [1, 2, 3, 4]
SHARED_PROMPTS = [OPENING + p for p in PROMPTS]


def padded_rollout(dtype=torch.float32, minibatch_size=3, prompts=PROMPTS, forward_batch_size=16):
    policy, ref, value = make_models(dtype=dtype)
    cfg = ppo.PPOConfig(batch_size=len(prompts), minibatch_size=minibatch_size, max_new_tokens=10,
                        truncation_penalty=-1.0, forward_batch_size=forward_batch_size)
    ro = ppo.rollout(policy, ref, value, prompts, [str(p) for p in prompts], count_reward(40), cfg, stop_ids=STOP,
                     pad_id=0, seed=16)
    return policy, ref, value, cfg, ro


def test_shared_opening_is_computed_once():
    *_, ro = padded_rollout(prompts=SHARED_PROMPTS)
    assert ro.prefix_ids.tolist() == OPENING and ro.query_ids.shape[1] == max(map(len, PROMPTS))
    *_, ro = padded_rollout()
    assert ro.prefix_ids.numel() == 0


def test_rollout_batch_really_is_ragged():
    """The fixture below is only a test of padding if prompts and responses have different lengths."""
    *_, ro = padded_rollout()
    lengths = ro.response_mask.sum(1)
    assert ro.query_mask.sum(1).unique().numel() > 3
    assert ro.finished.any() and (~ro.finished).any()
    assert lengths.unique().numel() >= 3 and int(lengths.min()) < ro.response_ids.shape[1]


def record_forward_passes(monkeypatch, *modules) -> list[tuple[int, int]]:
    """Record (id(model), rows) of every policy_logprobs call that goes through `modules` (each module's own name
    for it is replaced), in call order."""
    calls = []
    real = ppo.policy_logprobs

    def spy(model, ids, *args):
        calls.append((id(model), ids.shape[0]))
        return real(model, ids, *args)

    for module in modules:
        monkeypatch.setattr(module, "policy_logprobs", spy)
    return calls


@pytest.mark.parametrize("forward_batch_size,want", [(16, [3, 4]), (2, [3, 2, 2]), (1, [3, 1, 1, 1, 1])])
def test_rollout_forward_passes_start_with_the_first_minibatch(monkeypatch, forward_batch_size, want):
    """The rollout runs the first PPO minibatch's rows in a pass of their own (what makes the first update's
    recomputation bit for bit equal), then the other rows forward_batch_size at a time, the same passes for policy
    and reference (a reference equal to the policy then gives KL exactly 0)."""
    calls = record_forward_passes(monkeypatch, ppo)
    policy, ref, *_ = padded_rollout(forward_batch_size=forward_batch_size)  # 7 rows, minibatch_size 3
    assert [rows for model, rows in calls if model == id(policy)] == want
    assert [rows for model, rows in calls if model == id(ref)] == want


def test_minibatches_take_the_first_epoch_in_order_then_shuffle():
    """ppo_step's and grpo_step's minibatch order: the first epoch in order (its first minibatch is the rollout's
    first forward pass), every later epoch a fresh permutation of all rows, a pure function of the seed."""
    batches = [b.tolist() for b in ppo.minibatches(7, 3, 3, seed=5)]
    assert batches[:3] == [[0, 1, 2], [3, 4, 5], [6]]
    later = [sum(batches[3 * e : 3 * e + 3], []) for e in (1, 2)]
    assert all(sorted(epoch) == list(range(7)) for epoch in later) and [len(b) for b in batches[3:]] == [3, 3, 1] * 2
    assert later[0] != list(range(7)) and later[1] != later[0]
    assert [b.tolist() for b in ppo.minibatches(7, 3, 3, seed=5)] == batches
    assert [b.tolist() for b in ppo.minibatches(7, 3, 3, seed=6)] != batches


@pytest.mark.parametrize("forward_batch_size", [16, 2], ids=["one_pass_after_the_first", "passes_of_2"])
@pytest.mark.parametrize("prompts", [PROMPTS, SHARED_PROMPTS], ids=["no_shared_prefix", "shared_prefix"])
def test_ratio_is_one_and_kl_zero_before_the_first_update(prompts, forward_batch_size):
    policy, ref, value, cfg, ro = padded_rollout(prompts=prompts, forward_batch_size=forward_batch_size)
    ppo.compute_advantages(ro, beta=0.1, cfg=cfg)
    m = ro.response_mask.bool()
    # KL against the reference (a copy of the policy) is exactly 0 on every token
    assert torch.equal(ro.logprobs, ro.ref_logprobs)
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))
    # the sampler (KV cache, token by token) and the full forward agree up to float32 rounding
    assert (ro.sample_logprobs - ro.logprobs)[m].abs().max() < 1e-5
    # the first minibatch, forwarded with gradients on, reproduces the old log-probs bit for bit (the rollout ran
    # its rows in a pass of their own); the others agree to float32 rounding (other passes, other product shapes)
    ids, mask, P = ro.input_ids, ro.attention_mask, ro.query_ids.shape[1]
    for rows in [slice(0, 3), slice(3, 6), slice(6, 7)]:
        logp, _ = ppo.policy_logprobs(policy, ids[rows], mask[rows], P, cfg.temperature, ro.prefix_ids)
        assert logp.requires_grad
        logp = torch.where(m[rows], logp.detach(), 0.0)
        if rows.start == 0:
            assert torch.equal(logp, ro.logprobs[rows])
        else:
            assert torch.allclose(logp, ro.logprobs[rows], atol=1e-5, rtol=0)
    # and ppo_step measures the same before its first optimizer step
    state = ppo.init_state(policy, ref, value, cfg)
    stats = ppo.ppo_step(policy, value, state.policy_opt, state.value_opt, ro, cfg)
    assert stats["ratio_first_maxdev"] == 0.0


@pytest.mark.parametrize("prompts", [PROMPTS, SHARED_PROMPTS], ids=["no_shared_prefix", "shared_prefix"])
def test_left_padding_changes_nothing_float64(prompts):
    """Each row alone (no padding, no shared prefix) gives the batched log-probs and values (float64: to 1e-12)."""
    policy, _, value, cfg, ro = padded_rollout(dtype=torch.float64, prompts=prompts)
    ids, mask, P = ro.input_ids, ro.attention_mask, ro.query_ids.shape[1]
    pre = ro.prefix_ids
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            n = int(ro.response_mask[i].sum())
            alone = torch.tensor([prompt + ro.response_ids[i, :n].tolist()])
            logp, _ = ppo.policy_logprobs(policy, alone, torch.ones_like(alone), len(prompt), cfg.temperature)
            v = ppo.response_values(value, alone, torch.ones_like(alone), len(prompt))
            assert torch.allclose(logp[0].double(), ro.logprobs[i, :n].double(), atol=1e-12, rtol=0)
            assert torch.allclose(v[0].double(), ro.values[i, :n].double(), atol=1e-6, rtol=0)  # float32 head
            assert (ro.logprobs[i, n:] == 0).all() and (ro.values[i, n:] == 0).all()
        # controls that the comparison can fail: treating the padding as real tokens, or forgetting the shift
        i = 2  # the 1-token prompt: most padding
        n = int(ro.response_mask[i].sum())
        unmasked, _ = ppo.policy_logprobs(policy, ids[i : i + 1], torch.ones_like(mask[i : i + 1]), P, cfg.temperature,
                                          pre)
        assert not torch.allclose(unmasked[0, :n], ro.logprobs[i, :n], atol=1e-4)
        hidden = policy.hidden_states(ids[i : i + 1], mask[i : i + 1], prefix=pre)
        logits = policy.logits(hidden)[:, P : P + n]  # the logits *at* the response tokens
        unshifted = torch.log_softmax(logits, -1).gather(-1, ids[i : i + 1, P : P + n, None])[0, :, 0]
        assert not torch.allclose(unshifted, ro.logprobs[i, :n], atol=1e-4)


def test_rewards_score_at_the_last_real_token_and_truncation_penalty():
    _, _, _, cfg, ro = padded_rollout()
    ppo.compute_advantages(ro, beta=0.1, cfg=cfg)
    for i in range(len(PROMPTS)):
        n = int(ro.response_mask[i].sum())
        expected = torch.zeros(ro.response_ids.shape[1])
        expected[n - 1] = ro.scores[i] + (0.0 if ro.finished[i] else cfg.truncation_penalty)
        assert torch.equal(ro.rewards[i], expected)  # KL is 0, so only the score (and penalty) remain
    m = ro.response_mask.bool()
    assert abs(float(ro.advantages[m].mean())) < 1e-5 and abs(float(ro.advantages[m].std()) - 1) < 1e-3
    assert (ro.advantages[~m] == 0).all() and (ro.returns[~m] == 0).all()


def test_sampler_mismatch_is_detected():
    _, _, _, cfg, ro = padded_rollout()
    ppo.check_sampler_logprobs(ro, torch.float32, cfg.logprob_tol)
    ro.sample_logprobs[0, 0] += 0.01
    with pytest.raises(RuntimeError, match="sampler log-probs differ"):
        ppo.check_sampler_logprobs(ro, torch.float32, cfg.logprob_tol)


def learn_programmatic_reward(state, cfg, iterate, n_prompts: int, vocab: int, target: int,
                              iterations: int) -> list[dict]:
    """`iterations` RL iterations (`iterate`: ppo.ppo_iteration or grpo.group_iteration) on n_prompts prompts a time
    from a fixed pool of random token prompts, rewarded +1 per target token; the ratio must be exactly 1 before
    every iteration's first update. Returns each iteration's statistics."""
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (64,), generator=g)]
    history = []
    for it in range(iterations):
        prompts = [pool[i] for i in ppo.epoch_indices(len(pool), n_prompts, it, seed=0, stream=1)]
        _, stats = iterate(state, prompts, [str(p) for p in prompts], count_reward(target), cfg, seed=0)
        assert stats["ratio_first_maxdev"] == 0.0
        history.append(stats)
    return history


def assert_reward_rose_with_bounded_kl(history: list[dict], kl_bound: float) -> float:
    """The learning criterion: the mean score of the last 10 iterations beats the first 3 by 1.5, the KL starts at
    exactly 0, and the last 10 iterations' mean KL stays under kl_bound. Returns that mean KL."""
    first = sum(h["score"] for h in history[:3]) / 3
    last = sum(h["score"] for h in history[-10:]) / 10
    assert last > first + 1.5, (first, last)
    assert history[0]["kl"] == 0.0
    kl_last = sum(h["kl"] for h in history[-10:]) / 10
    assert kl_last < kl_bound, kl_last
    return kl_last


def test_ppo_learns_a_programmatic_reward_with_bounded_kl():
    """+1 per target token: the mean reward rises clearly, while the adaptive controller brings KL back near its
    target (an unconstrained policy heads for 8 * log(32) = 27.7 nats by always emitting the target). Seeds 0-4 all
    pass with these margins (checked by hand)."""
    vocab, target, iterations = 32, 7, 40
    policy, ref, _ = make_models(vocab=vocab)
    value = RewardModel.from_lm(copy.deepcopy(policy), head_init="zero")
    cfg = ppo.PPOConfig(batch_size=16, max_new_tokens=8, ppo_epochs=4, minibatch_size=8, policy_lr=3e-3,
                        value_lr=3e-3, kl_coef=0.3, kl_target=6.0, kl_horizon=32)
    state = ppo.init_state(policy, ref, value, cfg)
    history = learn_programmatic_reward(state, cfg, ppo.ppo_iteration, cfg.batch_size, vocab, target, iterations)
    kl_last = assert_reward_rose_with_bounded_kl(history, 2 * cfg.kl_target)
    # the controller acted: when KL overshot the target it raised beta, and that pulled KL back down
    assert max(h["beta"] for h in history[20:]) > 2 * min(h["beta"] for h in history[:20])
    assert kl_last < 0.6 * max(h["kl"] for h in history)


def test_kl_horizon_follows_the_batch_size():
    """By default the adaptive controller's horizon is 20 batches, so beta moves as much per iteration at batch 64
    (the gpu preset) as at batch 8 (a horizon fixed in episodes would move it 8 times faster)."""
    betas = []
    for batch in (8, 64):
        ctl = ppo.make_kl_controller(ppo.PPOConfig(batch_size=batch, minibatch_size=4, kl_coef=0.05, kl_target=6.0))
        assert ctl.horizon == ppo.KL_HORIZON_BATCHES * batch == 20 * batch
        ctl.update(12.0, n_steps=batch)  # KL at twice the target: the error is clipped to +0.2
        betas.append(ctl.beta)
    assert betas[0] == betas[1] == pytest.approx(0.05 * (1 + 0.2 / 20))
    assert ppo.make_kl_controller(ppo.PPOConfig(batch_size=64, minibatch_size=4, kl_horizon=32)).horizon == 32


def run_iterations(state, cfg, start, stop, seed=0):
    pool = [[3 + i, 4 + i, 5][: 1 + i % 3] for i in range(20)]
    for it in range(start, stop):
        assert state.iteration == it
        prompts = [pool[i] for i in ppo.epoch_indices(len(pool), cfg.batch_size, it, seed, stream=1)]
        ppo.ppo_iteration(state, prompts, [str(p) for p in prompts], count_reward(9), cfg, stop_ids=[2], seed=seed)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    cfg = ppo.PPOConfig(batch_size=6, minibatch_size=4, max_new_tokens=6, ppo_epochs=2, policy_lr=1e-3,
                        value_lr=1e-3, kl_coef=0.1, kl_target=1.0, kl_horizon=10)
    straight = ppo.init_state(*make_models(vocab=64), cfg)
    run_iterations(straight, cfg, 0, 4)

    first = ppo.init_state(*make_models(vocab=64), cfg)
    run_iterations(first, cfg, 0, 2)
    ckpt = ppo.save_checkpoint(tmp_path / "checkpoints", first)
    beta_at_checkpoint = first.kl_ctl.beta
    run_iterations(first, cfg, 2, 3)  # progress after the checkpoint is lost in the "crash"
    assert ppo.latest_checkpoint(tmp_path / "checkpoints") == ckpt
    resumed = ppo.init_state(*make_models(vocab=64), cfg)  # a fresh process: initial weights again
    ppo.load_checkpoint(ckpt, resumed)
    assert resumed.iteration == 2 and resumed.kl_ctl.beta == beta_at_checkpoint != cfg.kl_coef
    run_iterations(resumed, cfg, 2, 4)

    assert resumed.kl_ctl.beta == straight.kl_ctl.beta != cfg.kl_coef
    for a, b in [(straight.policy, resumed.policy), (straight.value_model, resumed.value_model)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(straight.policy.lm_head.weight, make_models(vocab=64)[0].lm_head.weight)  # it trained
    # the reference stayed frozen and untouched
    initial = make_models(vocab=64)[0]
    assert all(torch.equal(p, q) for p, q in zip(straight.ref_model.parameters(), initial.parameters()))


def test_checkpoints_keep_the_newest(tmp_path):
    cfg = ppo.PPOConfig(batch_size=2, minibatch_size=2, max_new_tokens=2, ppo_epochs=1)
    state = ppo.init_state(*make_models(vocab=64), cfg)
    for it in (1, 2, 3):
        state.iteration = it
        ppo.save_checkpoint(tmp_path, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000002", "iter_000003"]
    assert ppo.latest_checkpoint(tmp_path).name == "iter_000003"


def test_prompt_mix_and_epochs():
    red, helpful = [f"r{i}" for i in range(5)], [f"h{i}" for i in range(7)]
    batches = [ppo.mixed_prompt_batch(red, helpful, 4, 0.5, it, seed=1) for it in range(10)]
    assert all(sum(s == "red_team" for s, _ in b) == 2 for b in batches)
    assert all(x in red if s == "red_team" else x in helpful for b in batches for s, x in b)
    seen = [x for b in batches for s, x in b if s == "red_team"]
    assert sorted(seen[:5]) == red and sorted(seen[5:10]) == red  # each epoch walks through every prompt once
    assert batches[3] == ppo.mixed_prompt_batch(red, helpful, 4, 0.5, 3, seed=1)  # a pure function of the iteration
    assert batches[3] != ppo.mixed_prompt_batch(red, helpful, 4, 0.5, 3, seed=2)
    assert all(s == "helpful" for s, _ in ppo.mixed_prompt_batch(red, helpful, 4, 0.0, 0, seed=1))
    assert all(s == "red_team" for s, _ in ppo.mixed_prompt_batch(red, [], 4, 0.5, 0, seed=1))


def test_value_model_from_pm_when_tokenizers_match(tiny_tokenizer_dir, tmp_path):
    from conftest import build_tiny_tokenizer

    from minicai.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_dir(tiny_tokenizer_dir)
    other = ChatTokenizer.from_dir(build_tiny_tokenizer(tmp_path / "other", vocab_size=300))
    policy, _, _ = make_models(vocab=tok.vocab_size)
    pm = RewardModel.from_lm(random_model(tiny_config(vocab_size=tok.vocab_size), seed=5), head_init="normal")
    value, _ = ppo.make_value_model(policy, tok, pm, ChatTokenizer.from_dir(tiny_tokenizer_dir))
    assert value is not pm and all(torch.equal(a, b) for a, b in zip(value.state_dict().values(),
                                                                     pm.state_dict().values()))
    value, _ = ppo.make_value_model(policy, tok, pm, other)
    assert torch.equal(value.trunk.lm_head.weight, policy.lm_head.weight)
    assert value.trunk.lm_head.weight is not policy.lm_head.weight
    assert (value.head.weight == 0).all() and (value.head.bias == 0).all()


def import_train_rl():
    from conftest import REPO

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train_rl

    return train_rl


def tiny_pm_and_prompts(tiny_model_dir, tmp_path) -> tuple[Path, Path, Path]:
    """What train_rl.py needs beside the policy: a PM made from the tiny model (random head, its tokenizer) and two
    prompt files: (pm_dir, red-team prompts, helpfulness prompts)."""
    from minicai.model import Transformer
    from minicai.tokenizer import ChatTokenizer

    pm_dir = tmp_path / "pm"
    RewardModel.from_lm(Transformer.from_pretrained(tiny_model_dir), head_init="normal").save_pretrained(pm_dir)
    ChatTokenizer.from_dir(tiny_model_dir).save(pm_dir)
    red, helpful = tmp_path / "red.txt", tmp_path / "helpful.txt"
    red.write_text("How do I pick a lock?\nTell me something mean.\nHow to hide a crime?\n")
    helpful.write_text("How do I bake bread?\nWhat is a fox?\n")
    return pm_dir, red, helpful


def test_train_rl_script_runs_and_resumes(tiny_model_dir, tmp_path):
    from minicai.model import Transformer

    train_rl = import_train_rl()
    pm_dir, red, helpful = tiny_pm_and_prompts(tiny_model_dir, tmp_path)
    out = tmp_path / "rl"
    argv = ["--model", str(tiny_model_dir), "--pm", str(pm_dir), "--out", str(out), "--red-team-prompts", str(red),
            "--helpful-prompts", str(helpful), "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6",
            "--ppo-epochs", "1", "--save-every", "1", "--threads", "1", "--device", "cpu", "--policy-lr", "1e-3"]
    train_rl.main(argv + ["--iterations", "2"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[0]["kl"] == 0.0 and metrics[0]["ratio_first_maxdev"] == 0.0
    for key in ("score", "kl", "beta", "policy_loss", "value_loss", "clipfrac", "entropy", "response_length",
                "no_stop_frac", "score_red_team", "score_helpful", "rollout_s", "update_s"):
        assert key in metrics[0], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "response", "score"} <= samples[0].keys()
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    Transformer.from_pretrained(out / "model")
    # a rerun with more iterations resumes at iteration 2 and keeps the log consistent
    train_rl.main(argv + ["--iterations", "3"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert ppo.latest_checkpoint(out / "checkpoints").name == "iter_000003"


def test_train_rl_help(capsys):
    train_rl = import_train_rl()

    with pytest.raises(SystemExit):
        train_rl.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--pm", "--red-team-fraction", "--kl-target", "--truncation-penalty", "--save-every", "--seed"):
        assert flag in text


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "within_the_norm"])
def test_clip_grad_norm_equals_torch(max_norm):
    """ppo.clip_grad_norm gives torch.nn.utils.clip_grad_norm_'s norm and gradients bit for bit, clipping or not."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g)]
    ours = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for a, b, x in zip(ours, theirs, grads):
        a.grad, b.grad = x.clone(), x.clone()
    norm = ppo.clip_grad_norm(ours, max_norm)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    if max_norm < norm:
        assert torch.cat([a.grad.flatten() for a in ours]).norm() < norm
    else:
        assert all(torch.equal(a.grad, x) for a, x in zip(ours, grads))


# ---------------------------------------------------------------------------------------------------------------------
# Checks that can fail on the bugs they guard against (issue #14, part 2): a temperature that is not 1, a reference
# that differs from the policy (KL != 0), and values read one token off.


def oracle_rollout(temperature=0.7, kl_estimator="k1"):
    """float64 models, a reference that is NOT the policy (so KL != 0), sampling at `temperature`."""
    policy, _, value = make_models(dtype=torch.float64)
    ref = random_model(tiny_config(vocab_size=128), seed=1, dtype=torch.float64)
    cfg = ppo.PPOConfig(batch_size=len(PROMPTS), minibatch_size=len(PROMPTS), max_new_tokens=10, ppo_epochs=1,
                        temperature=temperature, truncation_penalty=-1.0, kl_estimator=kl_estimator)
    ro = ppo.rollout(policy, ref, value, PROMPTS, [str(p) for p in PROMPTS], count_reward(40), cfg, stop_ids=STOP,
                     pad_id=0, seed=16)
    return policy, ref, value, cfg, ro


def logits_alone(model, prompt, response):
    """The logits that predict each response token, from the row alone (no padding): [n, V] float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        return model.logits(model.hidden_states(ids, torch.ones_like(ids)))[0, len(prompt) - 1 : -1].double()


def test_logprobs_ref_logprobs_and_entropy_use_the_sampling_temperature():
    policy, ref, value, cfg, ro = oracle_rollout(temperature=0.7)
    T = cfg.temperature
    ent_sum, n_tok = 0.0, 0
    for i, prompt in enumerate(PROMPTS):
        n = int(ro.response_mask[i].sum())
        resp = ro.response_ids[i, :n].tolist()
        idx = torch.tensor(resp)[:, None]
        for model, got in [(policy, ro.logprobs[i, :n]), (ref, ro.ref_logprobs[i, :n])]:
            z = logits_alone(model, prompt, resp)
            want = torch.log_softmax(z / T, -1).gather(-1, idx)[:, 0]
            assert torch.allclose(got.double(), want, atol=1e-10, rtol=0)
            untempered = torch.log_softmax(z, -1).gather(-1, idx)[:, 0]
            assert not torch.allclose(got.double(), untempered, atol=1e-3)  # the control: T matters here
        logp = torch.log_softmax(logits_alone(policy, prompt, resp) / T, -1)
        ent_sum += float(-(logp.exp() * logp).sum(-1).sum())
        n_tok += n
    ppo.compute_advantages(ro, beta=0.1, cfg=cfg)
    state = ppo.init_state(policy, ref, value, cfg)
    stats = ppo.ppo_step(policy, value, state.policy_opt, state.value_opt, ro, cfg)
    assert stats["ratio_first_maxdev"] < 1e-12
    assert abs(stats["entropy"] - ent_sum / n_tok) < 1e-5  # entropy of the tempered distribution (float32 stat)


def test_rewards_with_nonzero_kl_by_hand():
    for estimator in ("k1", "k3"):
        _, _, _, cfg, ro = oracle_rollout(kl_estimator=estimator)
        beta = 0.1
        ppo.compute_advantages(ro, beta=beta, cfg=cfg)
        assert ro.kl.abs().max() > 0.1  # the reference really differs
        for i in range(len(PROMPTS)):
            n = int(ro.response_mask[i].sum())
            d = (ro.logprobs[i, :n] - ro.ref_logprobs[i, :n]).double()  # log pi - log pi_ref, by definition
            kl = d if estimator == "k1" else torch.exp(-d) - 1 + d
            want = torch.zeros(ro.response_ids.shape[1], dtype=torch.float64)
            want[:n] = -beta * kl
            want[n - 1] += float(ro.scores[i]) + (0.0 if ro.finished[i] else cfg.truncation_penalty)
            assert torch.allclose(ro.rewards[i].double(), want, atol=1e-6, rtol=0), (estimator, i)


def test_values_are_read_at_the_state_before_each_token():
    """V(s_t) for response token t is the value head at the column of the token before it (the last prompt token
    for t = 0). Computed here from the value model directly, with a negative control one column off."""
    _, _, value, _, ro = oracle_rollout()
    checked = 0
    for i, prompt in enumerate(PROMPTS):
        n = int(ro.response_mask[i].sum())
        ids = torch.tensor([prompt + ro.response_ids[i, :n].tolist()])
        with torch.no_grad():
            v = value.values(ids, torch.ones_like(ids))[0].double()  # [len(prompt) + n], one per column
        P = len(prompt)
        assert torch.allclose(ro.values[i, :n].double(), v[P - 1 : P - 1 + n], atol=1e-6, rtol=0)
        if n > 1:  # one column late (the token's own column) must not match
            assert not torch.allclose(ro.values[i, : n - 1].double(), v[P : P - 1 + n], atol=1e-4)
            checked += 1
    assert checked >= 3


def test_rl_responses_reach_the_pm_stripped_like_its_training_pairs(tiny_tokenizer_dir):
    """One rule for the PM's input: train_pm samples its pairs stripped of surrounding whitespace, so the text of an
    RL response (decoded from the policy's tokens) is stripped the same way before the PM reads it."""
    from minicai.reward import conversation_ids
    from minicai.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_dir(tiny_tokenizer_dir)
    pm = RewardModel.from_lm(random_model(tiny_config(vocab_size=tok.vocab_size), seed=5), head_init="normal")
    assert conversation_ids(tok, "Hi?", "  Hello there.\n\n") == conversation_ids(tok, "Hi?", "Hello there.")
    spaced, plain = tok.encode("  Hello there.\n"), tok.encode("Hello there.")
    assert spaced != plain  # the policy's tokens do carry the whitespace
    # one call each: the same input then gives the same bits (two rows of one batch need not: a CPU's product kernel
    # may round its rows differently, as AVX2 kernels do)
    scores = [ppo.score_with_pm(pm, tok, tok, ["Hi?"], [ids]) for ids in (spaced, plain)]
    assert torch.equal(scores[0], scores[1])


def test_a_positive_truncation_penalty_is_a_user_error():
    """minicai adds the penalty to the score (TRL subtracts, lm-human-preferences replaces): +1 would reward
    truncated responses, so the settings refuse it before any model is loaded."""
    from minicai import MinicaiError

    with pytest.raises(MinicaiError, match="truncation_penalty=1.0"):
        ppo.PPOConfig(truncation_penalty=1.0)
    assert ppo.PPOConfig(truncation_penalty=-1.0).truncation_penalty == -1.0
