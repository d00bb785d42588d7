"""The preference model (paper section 4.1): where the score is read, padding invariance, saving/loading, the
Bradley-Terry training learning a synthetic preference, and the held-out metrics."""

import random

import pytest
import torch

from minicai import MinicaiError
from minicai.model import random_model, tiny_config
from minicai.reward import (
    PMTrainConfig,
    RewardModel,
    conversation_ids,
    evaluate_preference_model,
    load_reward_model,
    normalize_scores,
    score_conversations,
    train_preference_model,
)
from minicai.sampling import pad_rows
from minicai.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return ChatTokenizer.from_dir(tiny_tokenizer_dir)


def tiny_rm(tok, seed=0, head_init="normal"):
    return RewardModel.from_lm(random_model(tiny_config(vocab_size=tok.vocab_size), seed=seed), head_init, seed=seed)


def test_score_is_read_at_the_last_real_token_whatever_the_padding(tok):
    rm = tiny_rm(tok)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, tok.vocab_size, (n,), generator=gen).tolist() for n in (4, 11, 7)]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
        right = rm(*pad_rows(rows, 0, "right"))
        left = rm(*pad_rows(rows, 0, "left"))
        other_pad = rm(*pad_rows(rows, 5, "right"))
        # the score is the head at the last real position: values() there, and not at any other position
        values = rm.values(*pad_rows(rows, 0, "right"))
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert torch.allclose(other_pad, alone, atol=1e-5)
    for i, r in enumerate(rows):
        assert values[i, len(r) - 1] == pytest.approx(float(alone[i]), abs=1e-5)
        assert values[i, len(r) - 2] != pytest.approx(float(alone[i]), abs=1e-5)
    assert right.dtype == torch.float32 and right.shape == (3,)


def test_zero_head_scores_zero_and_offset_is_subtracted(tok):
    rm = tiny_rm(tok, head_init="zero")
    ids, mask = pad_rows([[5, 6, 7], [8, 9]], 0, "right")
    assert torch.equal(rm(ids, mask), torch.zeros(2))
    rm.offset = 0.25
    assert torch.allclose(rm(ids, mask), torch.full((2,), -0.25))
    assert torch.allclose(rm.values(ids, mask), torch.full((2, 3), -0.25))
    with pytest.raises(MinicaiError):
        tiny_rm(tok, head_init="xavier")


def test_score_conversations_uses_the_chat_template(tok):
    rm = tiny_rm(tok, seed=2)
    prompts, responses = ["How do I bake bread?", "hi", "Tell me a joke"], ["Mix flour and water.", "hello!", "No."]
    got = score_conversations(rm, tok, prompts, responses, batch_size=2)
    for p, r, g in zip(prompts, responses, got):
        ids = tok.render([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
        assert tok.decode(ids[-2:], skip_special_tokens=False) == "<|im_end|>\n"  # read at the token after end-of-turn
        with torch.no_grad():
            assert float(rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))) == pytest.approx(
                float(g), abs=1e-5)
    assert conversation_ids(tok, prompts[0], responses[0], max_len=5) == conversation_ids(tok, prompts[0],
                                                                                            responses[0])[-5:]


def test_save_and_load_round_trip(tok, tiny_tokenizer_dir, tmp_path):
    rm = tiny_rm(tok, seed=4)
    rm.offset = -0.5
    rm.save_pretrained(tmp_path / "pm")
    tok.save(tmp_path / "pm")
    loaded, tok2 = load_reward_model(tmp_path / "pm")
    assert loaded.offset == -0.5 and tok2.vocab_size == tok.vocab_size
    a = score_conversations(rm, tok, ["q1", "q2"], ["a1", "a22"])
    b = score_conversations(loaded, tok2, ["q1", "q2"], ["a1", "a22"])
    assert torch.allclose(a, b, atol=1e-6)
    # the trunk is still a plain HF-layout causal LM
    assert (tmp_path / "pm" / "config.json").exists() and (tmp_path / "pm" / "model.safetensors").exists()
    with pytest.raises(MinicaiError, match="not a preference model"):
        RewardModel.from_pretrained(tiny_tokenizer_dir)


WORDS = ["bread", "water", "salt", "yeast", "rise", "quick", "brown", "fox", "dog", "lazy", "help", "safer"]


def synthetic_pairs(n, seed):
    """Responses of random words; the one holding the marker "!!" wins (soft labels 0.9 / 0.1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plain = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randint(0, len(words)), "!!")
        marked = " ".join(words)
        a_wins = rng.random() < 0.5
        out.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + "?",
                    "response_a": marked if a_wins else plain, "response_b": plain if a_wins else marked,
                    "p_a": 0.9 if a_wins else 0.1})
    return out


def test_pm_learns_a_synthetic_preference(tok):
    torch.manual_seed(0)
    rm = tiny_rm(tok, seed=0, head_init="zero")
    train, held_out = synthetic_pairs(128, seed=0), synthetic_pairs(64, seed=1)
    before = evaluate_preference_model(rm, tok, held_out)
    assert before["accuracy"] == 0.0  # every score is 0: all ties, and ties count as wrong
    steps = []
    history = train_preference_model(rm, tok, train, PMTrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=0),
                                     on_step=steps.append)
    assert len(history) == len(steps) == 3 * 8
    assert history[-1]["loss"] < history[0]["loss"]
    after = evaluate_preference_model(rm, tok, held_out)
    assert after["accuracy"] >= 0.95, after["accuracy"]
    assert after["mean_margin"] > 0
    assert sum(row["count"] for row in after["calibration"]) == 64


def test_scores_normalised_to_mean_0_std_1_on_a_calibration_set(tok, tmp_path):
    """lm-human-preferences' reward normalisation: offset and scale make the calibration samples' scores mean 0 and
    standard deviation 1; the value model (a copy of the PM) reads the same normalised head; both survive saving."""
    rm = tiny_rm(tok, seed=0, head_init="normal")
    pairs = synthetic_pairs(16, seed=2)
    prompts, responses = [p["prompt"] for p in pairs], [p["response_a"] for p in pairs]
    raw = score_conversations(rm, tok, prompts, responses)
    assert raw.std() < 0.5  # a random head: scores on their own, arbitrary scale
    normalize_scores(rm, raw.tolist())
    scores = score_conversations(rm, tok, prompts, responses).double()
    assert abs(float(scores.mean())) < 1e-5 and float(scores.std()) == pytest.approx(1.0, abs=1e-4)
    ids = torch.tensor([conversation_ids(tok, prompts[0], responses[0])])
    with torch.no_grad():
        assert float(rm.values(ids, torch.ones_like(ids))[0, -1]) == pytest.approx(float(scores[0]), abs=1e-5)
    rm.save_pretrained(tmp_path / "pm")
    again = RewardModel.from_pretrained(tmp_path / "pm")
    assert (again.offset, again.scale) == (rm.offset, rm.scale)
    normalize_scores(rm, [0.5, 0.5])  # all equal: the scale stays 1 rather than dividing by 0
    assert (rm.offset, rm.scale) == (0.5, 1.0)


def test_evaluation_metrics_by_hand(tok, monkeypatch):
    """accuracy (ties wrong, p = 0.5 skipped), margin and calibration bins from hand-set scores."""
    import minicai.reward as reward

    scores = {"a1": 2.0, "b1": 0.0, "a2": 1.0, "b2": 1.0, "a3": 0.0, "b3": 3.0, "a4": 5.0, "b4": 0.0}

    def fake_pair_scores(rm, tok, records, max_len=None):
        return (torch.tensor([scores[r["response_a"]] for r in records]),
                torch.tensor([scores[r["response_b"]] for r in records]))

    monkeypatch.setattr(reward, "pair_scores", fake_pair_scores)
    recs = [{"prompt": "", "response_a": f"a{i}", "response_b": f"b{i}", "p_a": p}
            for i, p in zip(range(1, 5), (0.8, 0.7, 0.2, 0.5))]
    m = evaluate_preference_model(tiny_rm(tok), tok, recs, batch_size=3, bins=2)
    # record 1 right (2 > 0), record 2 a tie (wrong), record 3 right (B preferred, 3 > 0), record 4 skipped
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["mean_margin"] == pytest.approx((2 + 0 + 3) / 3)
    sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x, dtype=torch.float64)))  # noqa: E731
    low = [row for row in m["calibration"] if row["bin"] == [0.0, 0.5]][0]
    high = [row for row in m["calibration"] if row["bin"] == [0.5, 1.0]][0]
    assert low["count"] == 1 and low["predicted"] == pytest.approx(float(sig(-3.0)))
    assert low["label"] == pytest.approx(0.2)
    assert high["count"] == 3 and high["label"] == pytest.approx((0.8 + 0.7 + 0.5) / 3)
    assert high["predicted"] == pytest.approx(float(sig(2.0) + sig(0.0) + sig(5.0)) / 3)


def test_train_pm_end_to_end_resumes_and_loads(tiny_model_dir, tmp_path, capsys):
    """train_pm.py on a tiny random model: pairs -> labels -> PM, outputs written; a rerun does no new work."""
    import json

    import train_pm

    out = tmp_path / "pm"
    argv = ["--policy", str(tiny_model_dir), "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu",
            "--num-red-team", "3", "--num-helpful", "2", "--max-new-tokens", "6", "--gen-batch-size", "2",
            "--label-batch-size", "2", "--eval-pairs", "2", "--pm-batch-size", "2", "--pm-max-len", "96"]
    train_pm.main(argv)
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pairs] == [0, 1, 2, 3, 4]
    assert [p["source"] for p in pairs] == ["red_team"] * 3 + ["helpful"] * 2
    assert all({"prompt", "response_a", "response_b", "seed"} <= set(p) for p in pairs)
    assert all(0 <= r["p_a"] <= 1 and len(r["logprobs_ab"]) == len(r["logprobs_ba"]) == 1 for r in labels)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pm"]["held_out"]["n"] == 2 and summary["pm"]["train_pairs"] == 3
    assert 0 <= summary["position_bias"]["share_first_preferred"] <= 1
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    rm, tok = load_reward_model(out / "model")
    assert rm.offset == pytest.approx(summary["pm"]["held_out"]["offset"])
    assert rm.scale == pytest.approx(summary["pm"]["held_out"]["scale"])
    assert torch.isfinite(score_conversations(rm, tok, [labels[0]["prompt"]], [labels[0]["response_a"]])).all()

    capsys.readouterr()
    train_pm.main(argv)  # everything is done: nothing is sampled, labelled or trained again
    assert "reusing it" in capsys.readouterr().out
    assert (out / "pairs.jsonl").read_text().count("\n") == 5 and (out / "labels.jsonl").read_text().count("\n") == 5
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(metrics) + 1  # only the re-evaluation


def test_train_pm_without_sl_model_says_how_to_fix(tmp_path, monkeypatch):
    import train_pm

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MinicaiError, match="run train_sl.py first or pass --policy DIR"):
        train_pm.main(["--out", str(tmp_path / "pm")])
