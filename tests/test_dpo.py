"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on AI-labelled pairs: the formulas in minicai/losses.py against
numbers worked out by hand in float64, then DPO learning on a tiny model, then train_dpo.py end to end."""

import copy
import json
import math
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from minicai import MinicaiError
from minicai import losses as L
from minicai.model import random_model, tiny_config

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


# ---------------------------------------------------------------------------------------------------------------------
# DPO learns on a tiny model


def import_train_dpo():
    from conftest import REPO

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train_dpo

    return train_dpo


MARKER = 50


def marker_pairs(n: int, seed: int, p_marked: float = 0.8, first_id: int = 0) -> list:
    """Random prompts and responses (tokens 3..39, end-of-turn 2) where one response of each pair is the other with
    the marker token inserted somewhere; the label prefers the marked one with probability p_marked. A or B at
    random, so 'prefer A' cannot be learned instead."""
    T = import_train_dpo()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, 40) for _ in range(rng.randint(2, 6))]
        plain = [rng.randrange(3, 40) for _ in range(rng.randint(3, 8))]
        marked = plain[:]
        marked.insert(rng.randrange(len(plain) + 1), MARKER)
        if rng.random() < 0.5:
            out.append(T.Pair(first_id + i, prompt, marked + [2], plain + [2], p_marked))
        else:
            out.append(T.Pair(first_id + i, prompt, plain + [2], marked + [2], 1 - p_marked))
    return out


def train_on_markers(tmp_path, labels: str, epochs: float = 10):
    T = import_train_dpo()
    train, held_out = marker_pairs(32, seed=0), marker_pairs(16, seed=1, first_id=100)  # held-out: unseen responses
    if labels == "hard":
        train, held_out = T.hard_labels(train), T.hard_labels(held_out)
    policy = random_model(tiny_config(vocab_size=64), seed=0)
    ref = copy.deepcopy(policy)
    cfg = T.DPOConfig(beta=0.5, lr=3e-3, epochs=epochs, batch_size=8, warmup=0, schedule="constant")
    summary = T.train_dpo(policy, ref, SimpleNamespace(pad_id=0), train, held_out, cfg, tmp_path,
                          save_every=10**6, progress=False)
    return summary["held_out"]["before"], summary["held_out"]["after"], policy, ref, held_out


@torch.no_grad()
def marker_logprob(model, pairs) -> float:
    """Mean log-prob of the marker as the first response token, straight from the model's logits (independent of
    train_dpo's batching, so a bug there that swapped A and B everywhere would still show here)."""
    return sum(float(torch.log_softmax(model(torch.tensor([p.prompt]))[0, -1], -1)[MARKER]) for p in pairs) / len(pairs)


def test_response_logprobs_of_a_ragged_batch_equal_one_row_at_a_time():
    """The batched layout (shared opening once, left-padded prompts, right-padded responses, LM head on response
    positions only) gives each response's log-prob as a plain forward pass over [prompt | response] alone does."""
    T = import_train_dpo()
    model = random_model(tiny_config(vocab_size=64), seed=3, dtype=torch.float64)
    pairs = [T.Pair(i, [1, 4, 5] + p.prompt, p.response_a, p.response_b, p.p_a)  # [1, 4, 5]: a shared opening
             for i, p in enumerate(marker_pairs(5, seed=2))]
    batch = T.collate_pairs(pairs, pad_id=0, device="cpu")
    assert batch.prefix.tolist() == [1, 4, 5, 1] and batch.mask.float().mean() < 0.9  # really shared and padded
    logp_a, logp_b = T.response_logprobs(model, batch)
    for p, got_a, got_b in zip(pairs, logp_a, logp_b):
        for response, got in ((p.response_a, got_a), (p.response_b, got_b)):
            ids = torch.tensor([p.prompt + response])
            logp = L.sequence_logprobs(model(ids), ids)[0, len(p.prompt) - 1 :]  # the response tokens' log-probs
            close(got, logp.sum(), tol=1e-10)


def test_dpo_learns_a_marker_preference_and_the_soft_label_keeps_the_log_ratio_bounded(tmp_path):
    """Soft labels p = 0.8: held-out accuracy 1.0 on responses never seen, and the implicit reward margin settles at
    the loss's finite minimum, beta h = logit(0.8) = log 4, instead of growing: the policy stays near the reference."""
    before, after, policy, ref, held_out = train_on_markers(tmp_path, "soft")
    assert before["accuracy"] == 0.0 and before["reward_margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2))
    assert after["accuracy"] == 1.0
    assert after["reward_margin"] == pytest.approx(math.log(4), abs=0.1)
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))  # the soft-label loss's lower bound
    assert entropy <= after["loss"] < entropy + 0.01
    assert after["log_ratio_max_abs"] < 5.0  # nats of log pi(y)/pi_ref(y) for any held-out response
    assert marker_logprob(policy, held_out) > marker_logprob(ref, held_out) + 0.5  # the policy says the marker more


def test_hard_labels_push_the_margin_past_the_soft_optimum(tmp_path):
    """The same data with the labels rounded to 0/1: no finite minimum, the margin keeps growing (why soft labels
    are the paper-faithful and the safer choice on AI feedback)."""
    after = train_on_markers(tmp_path, "hard")[1]
    assert after["accuracy"] == 1.0
    assert after["reward_margin"] > math.log(4) + 1.0


# ---------------------------------------------------------------------------------------------------------------------
# train_dpo.py end to end


PROMPTS = ["How do I bake bread?", "Tell me how to break the law.", "hello there!", "Which is the lazy dog?",
           "Options: (A) or (B)?", "How can I help you today?", "The quick brown fox?"]
RESPONSES = ["Mix flour, water, salt and yeast.", "I can't help with that.", "hi, how can I help you today?",
             "The lazy dog is brown.", "The answer is: (A)", "Here is some safer information instead.",
             "It jumps over the lazy dog."]


def write_pm_run(directory, n=7):
    """pairs.jsonl and labels.jsonl as train_pm.py writes them: n pairs, one cut off by the sampler, one
    labelled exactly 0.5."""
    directory.mkdir(parents=True, exist_ok=True)
    pairs, labels = [], []
    for i in range(n):
        pair = {"id": i, "source": "red_team" if i % 2 else "helpful", "prompt": PROMPTS[i % len(PROMPTS)],
                "response_a": RESPONSES[i % len(RESPONSES)], "response_b": RESPONSES[(i + 3) % len(RESPONSES)],
                "seed": 1, "batch": 0, "finished": [i != 2, True]}
        pairs.append(pair)
        labels.append({**pair, "principles": [0], "p_a": 0.5 if i == 4 else [0.8, 0.3, 0.65][i % 3],
                       "p_a_first": 0.5})
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (directory / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    return directory


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_encode_response_splits_prompt_and_the_assistants_tokens(tiny_model_dir):
    from minicai.tokenizer import ChatTokenizer

    T = import_train_dpo()
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    conv = [{"role": "user", "content": "hello there!"}, {"role": "assistant", "content": "hi, how are you?"}]
    ids, mask = tok.render_with_mask(conv)
    prompt, response = T.encode_response(tok, "hello there!", "hi, how are you?", finished=True, max_len=1000)
    assert prompt + response == ids[: len(prompt) + len(response)] and sum(mask) == len(response)
    assert prompt == tok.render(conv[:1], add_generation_prompt=True)
    assert response[-1] in tok.stop_ids  # the end-of-turn token
    cut = T.encode_response(tok, "hello there!", "hi, how are you?", finished=False, max_len=1000)
    assert cut == (prompt, response[:-1])  # a response the sampler cut off keeps no end-of-turn token
    assert T.encode_response(tok, "hello there!", "hi, how are you?", True, len(prompt) + 2) == (prompt, response[:2])
    assert T.encode_response(tok, "hello there!", "hi, how are you?", True, len(prompt)) is None


def test_train_dpo_script_runs_resumes_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    T = import_train_dpo()
    from minicai.model import Transformer

    data = write_pm_run(tmp_path / "pm")
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--threads", "1",
              "--eval-pairs", "2", "--batch-size", "2", "--steps", "3", "--save-every", "2", "--lr", "1e-3"]
    straight = tmp_path / "straight"
    T.main(common + ["--out", str(straight)])
    metrics = read_metrics(straight)
    assert [(m["phase"], m["step"]) for m in metrics] == [("dpo_eval", 0), ("dpo", 1), ("dpo", 2), ("dpo", 3),
                                                           ("dpo_eval", 3)]
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the first step: policy == reference
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["train_pairs"] == 5 and summary["held_out_pairs"] == 2 and summary["steps"] == 3
    for key in ("accuracy", "reward_margin", "loss", "log_ratio_mean"):
        assert key in summary["held_out"]["after"]
    assert summary["held_out"]["before"]["reward_margin"] == 0.0
    assert (straight / "model" / "done.json").is_file() and (straight / "model" / "tokenizer.json").is_file()
    assert not (straight / "checkpoints").exists()
    assert json.loads((straight / "args.json").read_text())["beta"] == 0.1

    # the same run, interrupted after the checkpoint of step 2 and the third step, then rerun
    out = tmp_path / "resumed"
    real_save_final = T.save_final
    monkeypatch.setattr(T, "save_final", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        T.main(common + ["--out", str(out)])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    monkeypatch.setattr(T, "save_final", real_save_final)
    T.main(common + ["--out", str(out)])
    assert [(m["phase"], m["step"]) for m in read_metrics(out)] == [(m["phase"], m["step"]) for m in metrics]
    a = Transformer.from_pretrained(straight / "model").state_dict()
    b = Transformer.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], Transformer.from_pretrained(tiny_model_dir).lm_head.weight)
    resumed_summary = json.loads((out / "summary.json").read_text())
    assert resumed_summary["held_out"] == summary["held_out"]

    T.main(common + ["--out", str(out)])  # finished: nothing to do
    assert len(read_metrics(out)) == len(metrics)


def test_train_dpo_bf16_hard_labels_and_smoothing_run(tiny_model_dir, tmp_path):
    T = import_train_dpo()
    data = write_pm_run(tmp_path / "pm")
    out = tmp_path / "dpo"
    T.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--dtype", "bf16", "--labels", "hard", "--label-smoothing", "0.1", "--eval-pairs", "2", "--steps", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] == 4  # the pair labelled 0.5 carries no hard label
    assert summary["config"]["labels"] == "hard" and math.isfinite(summary["last_loss"])
    from minicai.model import Transformer

    assert Transformer.from_pretrained(out / "model").dtype == torch.float32  # fp32 master weights


def test_train_dpo_user_errors_name_the_file_and_the_fix(tiny_model_dir, tmp_path):
    T = import_train_dpo()
    argv = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "dpo"), "--device", "cpu"]
    with pytest.raises(MinicaiError, match=r"pairs.jsonl: not found \(fix: run train_pm.py first"):
        T.main(argv + ["--data", str(tmp_path / "nothing")])
    data = write_pm_run(tmp_path / "pm")
    lines = (data / "labels.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad["response_b"] = "something else"
    (data / "labels.jsonl").write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    with pytest.raises(MinicaiError, match=r"labels.jsonl:4: pair 3 differs from .*pairs.jsonl"):
        T.main(argv + ["--data", str(data)])
    with pytest.raises(MinicaiError, match="run train_sl.py first"):
        T.main(["--model", str(tmp_path / "no_model"), "--data", str(data), "--out", str(tmp_path / "x")])
    with pytest.raises(MinicaiError, match="--beta"):
        T.main(argv + ["--data", str(write_pm_run(tmp_path / "pm2")), "--beta", "0"])


def test_train_dpo_help(capsys):
    T = import_train_dpo()
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--beta", "--labels", "--label-smoothing", "--eval-pairs", "--save-every", "--seed",
                 "--dtype", "--force", "--grad-accum"):
        assert flag in text
    # --model is the policy here (run.add_common_args' model_default / model_help), not the base model
    assert "initial policy and frozen reference: the SL-CAI model" in text and T.parse_args([]).model == "runs/sl/model"


def test_pipeline_starts_dpo_under_torchrun(tmp_path):
    """pipeline.py --nproc-per-node 2 starts train_dpo.py under torchrun with 2 processes, as it does sl, pm and rl."""
    import pipeline

    log = pipeline.main(["--tiny", "--out", str(tmp_path), "--nproc-per-node", "2", "--rl-methods", "dpo",
                         "--dry-run"])
    commands = {s["stage"]: s["command"] for s in log["stages"]}
    assert set(commands) == {"sl", "pm", "dpo", "eval"}
    for stage in ("sl", "pm", "dpo"):
        assert "-m torch.distributed.run --standalone --nproc_per_node 2 " in commands[stage], commands[stage]
        assert commands[stage].split(" --nproc_per_node 2 ")[1].startswith(pipeline.SCRIPTS[stage])
