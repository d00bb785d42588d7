"""The evaluation's three rooms: the statistics (minicai/stats.py) against hand computations (Wilson, t-interval,
position swap, win rates, Bradley-Terry Elo), the evasiveness heuristic on hand examples; the orchestration
(minicai/compare.py): the judge's bookkeeping with hand-set log-probs, one whole comparison of tiny random models,
resuming in a moved run folder; the report (minicai/report.py) with and without matplotlib, relative file names;
side by side: the KL to the SL-CAI model by hand and on tiny models, the cost columns, the computed reading."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicai import MinicaiError, compare
from minicai.compare import parse_named
from minicai.feedback import debiased_probability
from minicai.report import write_report
from minicai.stats import (
    ELO_SCALE,
    bradley_terry_elo,
    evasive_reason,
    evasiveness,
    mean_ci,
    summarise_judgments,
    t_quantile_975,
    toxicity_summary,
    wilson_interval,
    win_rate,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """compare.main(["--threads", "1"]) sets torch's thread count for the process; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def test_wilson_interval_matches_the_formula_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10), half-width 1.96/(1 + 0.38416) * sqrt(...)
    z2 = 1.959963984540054**2
    centre = (0.8 + z2 / 20) / (1 + z2 / 10)
    half = 1.959963984540054 / (1 + z2 / 10) * math.sqrt(0.8 * 0.2 / 10 + z2 / 400)
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values for 8/10
    # 0 of 10: the lower end is 0 and the upper end z^2 / (n + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_t_interval_of_the_mean_by_hand():
    st = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), t(0.975, 4) = 2.776, half-width 2.776 * sqrt(2.5) / sqrt(5)
    assert st["mean"] == pytest.approx(3.0) and st["std"] == pytest.approx(math.sqrt(2.5))
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (st["ci_low"], st["ci_high"]) == pytest.approx((3 - half, 3 + half), abs=1e-9)
    assert mean_ci([2.0])["ci_low"] is None and mean_ci([])["mean"] is None
    # the expansion beyond the table: t(0.975, 40) = 2.0211, t(0.975, 1000) = 1.9623
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=2e-4)
    assert t_quantile_975(30) > t_quantile_975(31) > t_quantile_975(200) > 1.96


def swap_averaged_probability(logp_ab, logp_ba) -> float:
    """How compare.judge_responses turns the stored log-probs into p_a: feedback.debiased_probability in float64."""
    return float(debiased_probability(torch.tensor(logp_ab, dtype=torch.float64),
                                      torch.tensor(logp_ba, dtype=torch.float64)))


def test_position_swap_averages_hand_set_logprobs():
    # a shown first: p(A) = 0.8; swapped (b shown first): p(A) = 0.6, so 1 - 0.6 = 0.4 for a -> (0.8 + 0.4) / 2
    p = swap_averaged_probability([math.log(0.8), math.log(0.2)], [math.log(0.6), math.log(0.4)])
    assert p == pytest.approx(0.6, abs=1e-12)
    # unnormalised log-probs: only their difference counts
    p = swap_averaged_probability([-1.0, -2.0], [-1.5, -1.0])
    assert p == pytest.approx(0.5 * (sigmoid(1.0) + 1 - sigmoid(-0.5)), abs=1e-12)
    # a judge that only prefers the first position gives 0.5 exactly
    assert swap_averaged_probability([0.0, -3.0], [0.0, -3.0]) == pytest.approx(0.5, abs=1e-15)


def test_win_rate_counts_ties_as_half():
    w = win_rate([0.9, 0.6, 0.5, 0.2])
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == pytest.approx(2.5 / 4)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    assert w["mean_p"] == pytest.approx(2.2 / 4)


def test_elo_two_models_by_hand():
    # b beats a in 3 of 4 games: sigmoid(t_b - t_a) = 3/4, so t_b - t_a = ln 3 and Elo_b = 1000 + 400 log10(3)
    outcomes = [("b", "a", 1.0)] * 3 + [("a", "b", 1.0)]
    elo = bradley_terry_elo(outcomes, ["a", "b"])
    assert elo["a"] == pytest.approx(1000.0)
    assert elo["b"] == pytest.approx(1000 + 400 * math.log10(3), abs=1e-6)  # 1190.85
    # one soft outcome with p = 0.75 is the same evidence
    assert bradley_terry_elo([("a", "b", 0.25)], ["a", "b"])["b"] == pytest.approx(elo["b"], abs=1e-6)
    # another anchor shifts every rating by the same amount
    other = bradley_terry_elo(outcomes, ["a", "b"], anchor="b")
    assert other["b"] == pytest.approx(1000.0) and other["a"] == pytest.approx(1000 - 400 * math.log10(3), abs=1e-6)


def test_elo_three_models_exact_fit():
    # odds 2:1 for b over a, 2:1 for c over b, 4:1 for c over a fit Bradley-Terry exactly: t = (0, ln 2, ln 4)
    outcomes = [("a", "b", 1 / 3), ("b", "c", 1 / 3), ("a", "c", 1 / 5)]
    elo = bradley_terry_elo(outcomes, ["a", "b", "c"])
    assert elo["b"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-6)  # 1120.41
    assert elo["c"] == pytest.approx(1000 + 400 * math.log10(4), abs=1e-6)  # 1240.82
    assert ELO_SCALE == pytest.approx(400 / math.log(10))


def test_elo_prior_keeps_a_clean_sweep_finite():
    sweep = [("a", "b", 1.0)] * 4
    with pytest.raises(ValueError, match="prior"):
        bradley_terry_elo(sweep, ["a", "b"])
    # one virtual tie: a has 4.5 wins in 5 games, sigmoid(t_a - t_b) = 0.9, t_a - t_b = ln 9
    elo = bradley_terry_elo(sweep, ["a", "b"], prior=1.0)
    assert elo["a"] - elo["b"] == pytest.approx(400 * math.log10(9), abs=1e-6)  # 381.70
    with pytest.raises(ValueError, match="link"):
        bradley_terry_elo([("a", "b", 0.5)], ["a", "b", "c"], prior=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Evasiveness, toxicity, names


@pytest.mark.parametrize("text, reason", [
    ("I can't help with that.", "refusal without explanation"),
    ("I'm sorry, but I will not do that for you today.", "refusal without explanation"),
    ("I can\u2019t do that for you, sorry friend.", "refusal without explanation"),  # a curly apostrophe
    ("As an AI language model I cannot answer this question.", "refusal without explanation"),
    ("I can't help with that because it could seriously hurt someone.", None),  # a reason
    ("I won't explain that, but if you are being bullied you could talk to a teacher.", None),  # an alternative
    ("Here is a simple recipe: mix flour, water, salt and yeast.", None),
    ("No.", "short"),
    ("", "short"),
])
def test_evasiveness_heuristic_on_hand_examples(text, reason):
    assert evasive_reason(text) == reason


def test_evasiveness_summary():
    e = evasiveness(["I can't help with that.", "No.", "Sure, here is how to bake bread at home."])
    assert (e["n"], e["evasive"], e["refusal"], e["short"]) == (3, 2, 1, 1)
    assert e["share"] == pytest.approx(2 / 3)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx(wilson_interval(2, 3))


def test_toxicity_summary_and_missing_package(monkeypatch):
    t = toxicity_summary([0.1, 0.7, 0.5])
    assert t["mean"] == pytest.approx(1.3 / 3) and t["share_toxic"] == pytest.approx(2 / 3)
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import now raises ImportError
    assert compare.load_toxicity_scorer() is None


def test_toxicity_scorer_ranks_an_insult_above_a_recipe():
    pytest.importorskip("profanity_check", reason="alt-profanity-check is an optional dependency")
    score = compare.load_toxicity_scorer()
    insult, recipe = score(["you are a stupid worthless idiot", "mix flour, water and yeast, then bake"])
    assert insult > 0.5 > recipe


def test_parse_named():
    assert parse_named("sl=runs/sl/model", "model") == ("sl", "runs/sl/model")
    assert parse_named("runs/rl/model", "model") == ("rl", "runs/rl/model")
    with pytest.raises(MinicaiError):
        parse_named("=x", "model")


# ---------------------------------------------------------------------------------------------------------------------
# The judge with hand-set log-probs


def _responses(models_to_text, prompts, set_name="red_team"):
    return {(m, set_name): [{"prompt": p, "response": text, "index": i} for i, p in enumerate(prompts)]
            for m, text in models_to_text.items()}


def test_cached_computes_only_the_missing_keys_once_and_keeps_the_rest(tmp_path):
    """compare.cached (hhh_cache.json, kl_cache.json): one compute call for the keys not yet stored, none when all
    are; results stored earlier are kept and returned in the order asked."""
    path = tmp_path / "c.json"
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return {k: {"value": k.upper()} for k in missing}

    assert compare.cached(path, ["a", "b"], compute) == {"a": {"value": "A"}, "b": {"value": "B"}}
    assert compare.cached(path, ["c", "a"], compute) == {"c": {"value": "C"}, "a": {"value": "A"}}
    assert compare.cached(path, ["b", "c"], compute) == {"b": {"value": "B"}, "c": {"value": "C"}}
    assert calls == [["a", "b"], ["c"]]
    assert json.loads(path.read_text()) == {"a": {"value": "A"}, "b": {"value": "B"}, "c": {"value": "C"}}
    assert compare.cached_hhh(tmp_path, "k", lambda: {"accuracy": 0.5}) == {"accuracy": 0.5}
    assert compare.cached_hhh(tmp_path, "k", lambda: 1 / 0) == {"accuracy": 0.5}  # stored: not computed again


def test_judge_swaps_positions_and_orients_win_rates(tiny_model_dir, tmp_path, monkeypatch):
    """A fake judge prefers position (A) by 1 nat and the response containing "safe" by 2 nats. P(safe better)
    must be (sigmoid(3) + 1 - sigmoid(-1)) / 2 whatever the order the pair is stored in."""
    import minicai.feedback as feedback

    calls = []

    def fake_answer_logprobs(model, tok, texts, batch_size=8):
        calls.append(len(texts))
        rows = []
        for t in texts:
            d = 1.0 + (2.0 if "(A) [[[safe" in t else -2.0 if "(B) [[[safe" in t else 0.0)
            rows.append([0.0, -d])  # logp(A) - logp(B) = d
        return torch.tensor(rows)

    monkeypatch.setattr(feedback, "answer_logprobs", fake_answer_logprobs)
    responses = _responses({"initial": "unsafe words", "sl": "safe words"}, ["p0", "p1"])
    recs = compare.judge_responses(tiny_model_dir, ["initial", "sl"], responses, ["red_team"], tmp_path, "cpu",
                                   torch.float32, chat=True, batch_size=4)
    p_safe = 0.5 * (sigmoid(3.0) + 1 - sigmoid(-1.0))
    assert len(recs) == 2 * 2  # 2 criteria x 1 pair x 2 prompts
    for r in recs:
        assert (r["model_a"], r["model_b"]) == ("initial", "sl")
        assert r["p_a"] == pytest.approx(1 - p_safe, abs=1e-9)  # P(initial better)
        assert r["p_a_first"] == pytest.approx(sigmoid(-1.0), abs=1e-6)  # before the swap: position bias shows
    summary = summarise_judgments(recs, ["initial", "sl"], "initial", prior=1.0)
    w = summary["win_rates"]["red_team"]["harmless"][0]
    assert (w["model"], w["opponent"], w["wins"], w["n"]) == ("sl", "initial", 2, 2)
    assert w["mean_p"] == pytest.approx(p_safe)
    # Elo with one virtual tie: sl has 2 * p_safe + 0.5 wins in 3 games
    share = (2 * p_safe + 0.5) / 3
    expected = 1000 + ELO_SCALE * math.log(share / (1 - share))
    assert summary["elo"]["red_team"]["helpful"]["sl"] == pytest.approx(expected, abs=1e-6)
    assert summary["elo"]["all"]["harmless"]["sl"] == pytest.approx(expected, abs=1e-6)
    assert list(summary["elo"]) == ["red_team", "all"]

    # a rerun reuses judgments.jsonl: the judge is not asked again
    calls.clear()
    again = compare.judge_responses(tiny_model_dir, ["initial", "sl"], responses, ["red_team"], tmp_path, "cpu",
                                    torch.float32, chat=True, batch_size=4)
    assert calls == [] and [r["p_a"] for r in again] == [r["p_a"] for r in recs]
    # a changed response is judged again
    responses[("sl", "red_team")][1]["response"] = "safe but different"
    compare.judge_responses(tiny_model_dir, ["initial", "sl"], responses, ["red_team"], tmp_path, "cpu",
                            torch.float32, chat=True, batch_size=4)
    assert sum(calls) == 2 * 2  # 1 prompt x 2 criteria x 2 orders


# ---------------------------------------------------------------------------------------------------------------------
# The report files


def synthetic_report() -> tuple[dict, list[dict]]:
    names = ["initial", "sl", "rl"]
    pm = {"red_team": {m: {**mean_ci([k + 0.1 * i for i in range(5)]), "delta_vs_anchor": mean_ci([k] * 2 + [k + 1])}
                       for k, m in enumerate(names)}}
    judgments = []
    for crit in ("harmless", "helpful"):
        for a, b, p in (("initial", "sl", 0.3), ("initial", "rl", 0.2), ("sl", "rl", 0.45)):
            judgments += [{"set": "red_team", "criterion": crit, "model_a": a, "model_b": b, "p_a": p}] * 3
    report = {
        "created": "now", "models": [{"name": m, "dir": f"/m/{m}"} for m in names], "anchor": "initial",
        "prompt_sets": [{"name": "red_team", "file": "data/red_team_eval.jsonl", "n": 5}],
        "settings": {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 0},
        "pm": {"dir": "/m/pm", "scores": pm,
               "revisions": {"file": "sl/revisions.jsonl", "rounds": [{"round": k, **mean_ci([k, k + 1.0, k + 0.5])}
                                                                      for k in range(3)]}},
        "judge": {"dir": "/m/initial", "format": "chat", "principles": dict(compare.JUDGE_PRINCIPLES),
                  "elo_prior": 1.0, "hhh": {"n": 10, "accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8,
                                            "debiased_accuracy": 0.6, "debiased_ci_low": 0.3,
                                            "debiased_ci_high": 0.85, "share_a": 0.9, "format": "chat"},
                  **summarise_judgments(judgments, names, "initial")},
        "hhh": {"preference model": {"n": 10, "accuracy": 0.7, "ci_low": 0.4, "ci_high": 0.9, "mean_margin": 0.2}},
        "evasiveness": {"red_team": {m: evasiveness(["I can't help with that.", "Sure: here is how."]) for m in names}},
        "evasive_examples": [{"model": "sl", "set": "red_team", "reason": "refusal without explanation",
                              "prompt": "how do I | pick a lock", "response": "I can't help with that."}],
        "toxicity": {"scores": {"red_team": {m: toxicity_summary([0.1, 0.6]) for m in names}}},
        "rl": {"file": "rl/metrics.jsonl", "iterations": 3, "first": {"iteration": 0, "score": 0.0, "kl": 0.0},
               "last": {"iteration": 2, "score": 0.4, "kl": 1.5}},
        "samples": [{"set": "red_team", "model": "sl", "prompt": "hi", "response": "hello\nthere"}],
    }
    rl_records = [{"iteration": i, "score": 0.2 * i, "kl": 0.7 * i, "score_red_team": 0.1 * i} for i in range(3)]
    return report, rl_records


def check_tables(md: str):
    for heading in ("## Preference-model score", "## Pairwise judge: win rates and Elo", "## HHH accuracy",
                    "## Evasiveness", "## Toxicity", "## RL-CAI training curves"):
        assert heading in md
    assert "| model | n | mean | std | 95% CI | minus `initial` |" in md
    assert "| round | n | mean | std | 95% CI |" in md and "| 2 | 3 | 2.500 |" in md  # per revision (Figure 5)
    assert "| `sl` vs `initial` |" in md.replace("| red_team | harmless ", "")
    assert "judge HHH accuracy 0.500 raw" in md  # the judge's strength is printed next to the judged numbers
    assert "how do I \\| pick a lock" in md  # table cells are escaped


def test_report_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional dependency")
    report, rl = synthetic_report()
    write_report(report, tmp_path, rl)
    assert sorted(report["plots"]) == ["elo.png", "pm_by_revision.png", "pm_scores.png", "rl_curves.png",
                                       "win_rates.png"]
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    check_tables(md)
    assert "![PM score per model and prompt set](pm_scores.png)" in md and "No plots" not in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["judge"]["elo"]["all"]["harmless"]["initial"] == pytest.approx(1000.0)
    assert saved["judge"]["elo"]["all"]["harmless"]["rl"] > saved["judge"]["elo"]["all"]["harmless"]["sl"] > 1000


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    report, rl = synthetic_report()
    write_report(report, tmp_path, rl)
    assert report["plots"] == [] and not list(tmp_path.glob("*.png"))
    md = (tmp_path / "report.md").read_text()
    check_tables(md)
    assert "No plots: matplotlib is not installed" in md and "](pm_scores.png)" not in md
    assert json.loads((tmp_path / "report.json").read_text())["pm"]["scores"]["red_team"]["sl"]["n"] == 5


# ---------------------------------------------------------------------------------------------------------------------
# A whole comparison of tiny random models


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_model_dir):
    from conftest import build_tiny_model_dir

    from minicai.model import random_model, tiny_config
    from minicai.reward import RewardModel
    from minicai.tokenizer import ChatTokenizer

    root = tmp_path_factory.mktemp("compare")
    other = build_tiny_model_dir(root / "other", seed=1)
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    rm = RewardModel.from_lm(random_model(tiny_config(vocab_size=tok.vocab_size), seed=3), head_init="normal", seed=3)
    pm_dir = root / "pm"
    rm.save_pretrained(pm_dir)
    tok.save(pm_dir)
    rl_metrics = root / "metrics.jsonl"
    rl_metrics.write_text("".join(json.dumps({"iteration": i, "score": 0.1 * i, "kl": 0.2 * i}) + "\n"
                                  for i in range(3)))
    revisions = root / "revisions.jsonl"  # train_sl.py's layout, two prompts, the second revision of one failed
    revisions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p0", "initial_response": "bad", "rounds": [
            {"round": 1, "revision": "better", "failed": False}, {"round": 2, "revision": "", "failed": True}]},
        {"prompt": "p1", "initial_response": "worse", "rounds": [
            {"round": 1, "revision": "fine", "failed": False}, {"round": 2, "revision": "good", "failed": False}]},
    ]))
    return {"root": root, "other": other, "pm": pm_dir, "rl": rl_metrics, "revisions": revisions}


def test_compare_end_to_end_on_tiny_models(tiny_model_dir, tiny_setup, tmp_path):
    from minicai.reward import load_reward_model, score_conversations

    out = tmp_path / "report"
    argv = [f"a={tiny_model_dir}", f"b={tiny_setup['other']}", "--pm", str(tiny_setup["pm"]),
            "--judge", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "4", "--hhh-limit", "2",
            "--rl-metrics", str(tiny_setup["rl"]), "--out", str(out), "--seed", "1", "--no-toxicity", "--threads", "1",
            "--revisions", str(tiny_setup["revisions"])]
    report = compare.main(argv)
    md = (out / "report.md").read_text()
    assert "## Preference-model score" in md and "| `b` | 2 |" in md and "`b` vs `a`" in md
    lines = (out / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # models x sets x prompts
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 2 * 2 * 2  # sets x criteria x prompts
    # the PM numbers are the PM's scores of the saved responses
    recs = [json.loads(x) for x in lines]
    b_red = [r for r in recs if r["model"] == "b" and r["set"] == "red_team"]
    rm, tok = load_reward_model(tiny_setup["pm"])
    direct = score_conversations(rm, tok, [r["prompt"] for r in b_red], [r["response"] for r in b_red])
    assert report["pm"]["scores"]["red_team"]["b"]["mean"] == pytest.approx(float(direct.mean()), abs=1e-5)
    assert report["rl"]["last"]["kl"] == pytest.approx(0.4)
    rounds = report["pm"]["revisions"]["rounds"]
    assert [(r["round"], r["n"]) for r in rounds] == [(0, 2), (1, 2), (2, 1)]  # the failed revision is left out
    assert rounds[2]["mean"] == pytest.approx(float(score_conversations(rm, tok, ["p1"], ["good"])[0]), abs=1e-5)
    assert report["judge"]["elo"]["all"]["harmless"]["a"] == pytest.approx(1000.0)
    if report["judge"].get("hhh"):  # ../shared present: the judge's strength is measured and printed
        assert "judge HHH accuracy" in md and report["hhh"]["preference model"]["n"] == 2

    # a rerun reuses every response and judgment; re-rendering from report.json needs no model at all
    compare.main(argv)
    assert (out / "responses.jsonl").read_text().splitlines() == lines
    (out / "report.md").unlink()
    compare.main(["--report-only", "--out", str(out)])
    assert "## Evasiveness" in (out / "report.md").read_text()


def test_compare_user_errors(tiny_model_dir, tmp_path):
    with pytest.raises(MinicaiError, match="reward_head"):
        compare.main([f"a={tiny_model_dir}", "--pm", str(tiny_model_dir), "--out", str(tmp_path), "--limit", "1",
                      "--max-new-tokens", "2", "--judge", "none", "--no-hhh", "--no-toxicity"])
    with pytest.raises(MinicaiError, match="twice"):
        compare.main([f"a={tiny_model_dir}", f"a={tiny_model_dir}", "--out", str(tmp_path)])
    with pytest.raises(MinicaiError, match="no report"):
        compare.main(["--report-only", "--out", str(tmp_path / "nothing")])


def test_module_help_runs_on_its_own():
    res = subprocess.run([sys.executable, "-m", "minicai.compare", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "NAME=DIR" in res.stdout and "--hhh-limit" in res.stdout
    assert "--model" not in res.stdout  # the common flag is hidden: the models are positional here


def test_evaluate_cli_routes_compare_to_this_module():
    from minicai import compare, evaluate

    args = evaluate.build_parser().parse_args(["compare", "initial=default", "sl=runs/sl/model", "--limit", "3"])
    assert args.func is compare.run_compare
    assert args.models == ["initial=default", "sl=runs/sl/model"] and args.limit == 3


def test_a_moved_run_folder_resumes_and_reports_name_no_absolute_paths(tiny_model_dir, tiny_setup, tmp_path):
    """The cache keys hash each model's content, not its directory: after the whole folder (models and run) moves,
    a rerun reuses every response and judgment. report.md / report.json name files relative to the repository or
    the run, never by the machine's absolute paths."""
    import shutil

    first = tmp_path / "first"
    shutil.copytree(tiny_model_dir, first / "models" / "a")
    shutil.copytree(tiny_setup["other"], first / "models" / "b")

    def run(root: Path) -> dict:
        return compare.main([f"a={root / 'models' / 'a'}", f"b={root / 'models' / 'b'}", "--judge",
                             str(root / "models" / "a"), "--pm", "none", "--no-hhh", "--no-toxicity", "--limit", "2",
                             "--max-new-tokens", "3", "--rl-metrics", "none", "--revisions", "none",
                             "--out", str(root / "report"), "--threads", "1"])

    run(first)
    responses = (first / "report" / "responses.jsonl").read_text()
    judgments = (first / "report" / "judgments.jsonl").read_text()
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    report = run(moved)
    assert (moved / "report" / "responses.jsonl").read_text() == responses  # nothing generated again
    assert (moved / "report" / "judgments.jsonl").read_text() == judgments  # nothing judged again
    assert [m["dir"] for m in report["models"]] == ["../models/a", "../models/b"]
    assert report["judge"]["dir"] == "../models/a"
    assert [p["file"] for p in report["prompt_sets"]] == ["data/red_team_eval.jsonl", "data/helpful_eval.jsonl"]
    for name in ("report.md", "report.json", "responses.jsonl", "judgments.jsonl"):
        text = (moved / "report" / name).read_text()
        assert str(tmp_path) not in text and str(REPO) not in text and str(Path.home()) not in text, name
    # a changed model is not mistaken for the old one
    from safetensors.torch import load_file, save_file

    weights = moved / "models" / "b" / "model.safetensors"
    state = load_file(weights)
    save_file(state, weights)
    before = compare.model_fingerprint(weights.parent)
    save_file({k: v + 0.01 for k, v in state.items()}, weights)  # same names, shapes and size; other values
    assert compare.model_fingerprint(weights.parent) != before
    save_file(state, weights)
    assert compare.model_fingerprint(weights.parent) == before


def test_judge_note_reads_this_runs_numbers(tmp_path):
    """The report's note on the judge's strength quotes the measured share of "(A)" answers, not a fixed number."""
    from minicai.report import render_markdown

    report = {"created": "now", "models": [{"name": "a", "dir": "a"}, {"name": "b", "dir": "b"}], "anchor": "a",
              "prompt_sets": [], "settings": {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0},
              "judge": {"dir": "j", "format": "chat", "principles": {"harmless": "?"}, "elo_prior": 1.0,
                        "win_rates": {"s": {"harmless": []}}, "elo": {"s": {"harmless": {"a": 1000.0, "b": 990.0}}},
                        "hhh": {"n": 4, "accuracy": 0.5, "ci_low": 0.1, "ci_high": 0.9, "debiased_accuracy": 0.5,
                                "share_a": 0.25}}}
    md = render_markdown(report)
    assert "answered \"(A)\" to 25.0% of the HHH questions" in md and "98.7" not in md
    del report["judge"]["hhh"]
    assert "was not measured in this run" in render_markdown(report)


# ---------------------------------------------------------------------------------------------------------------------
# Side by side (pipeline.py --rl-methods): KL to the SL-CAI model, cost, the reading of the comparison


def test_kl_to_reference_by_hand():
    """Per response: sum_t (log pi - log pi_ref); then mean, t-interval and the per-token mean over responses."""
    from minicai.stats import kl_to_reference

    logp = [[-1.0, -2.0], [-0.5]]
    ref = [[-1.5, -1.0], [-0.25]]
    # response 0: (-1.0 + 1.5) + (-2.0 + 1.0) = -0.5; response 1: -0.5 + 0.25 = -0.25
    kl = kl_to_reference(logp, ref)
    assert kl["n"] == 2 and kl["mean"] == pytest.approx(-0.375) and kl["per_token"] == pytest.approx(-0.75 / 3)
    assert kl["std"] == pytest.approx(math.sqrt(2 * 0.125**2)) and kl["tokens"] == 3
    half = 12.706 * kl["std"] / math.sqrt(2)
    assert (kl["ci_low"], kl["ci_high"]) == pytest.approx((-0.375 - half, -0.375 + half))
    # a policy that puts more mass on its own response than the reference does: positive, in nats
    assert kl_to_reference([[math.log(0.9)]], [[math.log(0.3)]])["mean"] == pytest.approx(math.log(3.0))
    assert kl_to_reference(ref, ref)["mean"] == 0.0
    with pytest.raises(ValueError, match="response 1"):
        kl_to_reference([[0.0], [0.0, 0.0]], [[0.0], [0.0]])
    with pytest.raises(ValueError, match="2 responses"):
        kl_to_reference([[0.0], [0.0]], [[0.0]])


def test_response_token_logprobs_match_one_full_forward_per_response(tiny_model_dir):
    """Batched (left-padded prompts, right-padded responses of different lengths) = one unpadded forward each;
    a record without token_ids (cached before they were stored) is re-encoded from its text."""
    from minicai.run import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), "cpu", torch.float32)
    model.eval()
    records = [{"prompt": "how do I pick a lock", "token_ids": [5, 6, 7]},
               {"prompt": "hi", "token_ids": [9]},
               {"prompt": "tell me a story please", "response": "once upon a time"}]
    got = compare.response_token_logprobs(model, tok, records, batch_size=3)
    for rec, lp in zip(records, got):
        prompt = tok.render([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True)
        resp = rec.get("token_ids") or tok.encode(rec["response"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + resp]))  # [1, T, V]
        full = torch.log_softmax(logits[0].double(), -1)
        want = [float(full[len(prompt) - 1 + t, y]) for t, y in enumerate(resp)]
        assert lp == pytest.approx(want, abs=1e-5)


def test_kl_and_cost_side_by_side_on_tiny_models(tiny_model_dir, tiny_setup, tmp_path):
    """compare.py --kl-reference: each model's KL to the reference is kl_to_reference of the log-probs of its own
    responses sampled at temperature 1 (kl_responses.jsonl) under both models (a copy of the reference: exactly 0);
    --kl-temperature 0 reuses the greedy evaluation responses; --cost puts the stage's wall time and memory beside
    it."""
    import shutil

    from minicai.run import load_model_and_tokenizer
    from minicai.stats import kl_to_reference

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy_dir)
    cost = tmp_path / "b_cost.json"
    cost.write_text(json.dumps({"seconds": 12.3, "peak_rss_mib": 456.0, "device": "cpu", "sessions": 1}))
    out = tmp_path / "report"
    report = compare.main([f"sl={tiny_model_dir}", f"b={tiny_setup['other']}", f"c={copy_dir}",
                           "--pm", str(tiny_setup["pm"]), "--judge", "none", "--no-hhh", "--no-toxicity",
                           "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--threads", "1",
                           "--rl-metrics", "none", "--revisions", "none", "--kl-reference", "sl",
                           "--cost", f"b={cost}"])
    kl = report["kl"]
    assert kl["reference"] == "sl" and kl["set"] == "red_team" and sorted(kl["models"]) == ["b", "c"]
    assert kl["models"]["c"]["mean"] == 0.0  # same weights as the reference: every log-ratio is exactly 0
    recs = [json.loads(x) for x in (out / "kl_responses.jsonl").read_text().splitlines()]
    assert sorted({r["model"] for r in recs}) == ["b", "c"] and all(r["temperature"] == 1.0 for r in recs)
    b_red = [r for r in recs if r["model"] == "b" and r["set"] == "red_team"]
    logps = {}
    for name, d in (("b", tiny_setup["other"]), ("sl", tiny_model_dir)):
        model, tok, _ = load_model_and_tokenizer(str(d), "cpu", torch.float32)
        logps[name] = compare.response_token_logprobs(model.eval(), tok, b_red)
    want = kl_to_reference(logps["b"], logps["sl"])
    assert kl["models"]["b"]["mean"] == pytest.approx(want["mean"], abs=1e-6) and want["mean"] != 0.0
    assert report["cost"]["b"]["seconds"] == 12.3
    md = (out / "report.md").read_text()
    table = md.split("## Methods side by side")[1].split("\n## ")[0]
    assert "| `sl` | SL-CAI |" in table and "0 (reference)" in table
    row_b = next(line for line in table.splitlines() if line.startswith("| `b` |"))
    assert f"{want['mean']:.3f}" in row_b and "12 s" in row_b and "456 MiB RSS" in row_b
    assert "| `c` |" in table and "1 s" not in next(x for x in table.splitlines() if x.startswith("| `c` |"))
    # cached: a rerun loads no model for the KL
    again = compare.main([f"sl={tiny_model_dir}", f"b={tiny_setup['other']}", "--pm", str(tiny_setup["pm"]),
                          "--judge", "none", "--no-hhh", "--no-toxicity", "--limit", "2", "--max-new-tokens", "4",
                          "--out", str(out), "--threads", "1", "--rl-metrics", "none", "--revisions", "none",
                          "--kl-reference", "sl"])
    assert again["kl"]["models"]["b"] == kl["models"]["b"]
    greedy = compare.main([f"sl={tiny_model_dir}", f"b={tiny_setup['other']}", "--pm", "none", "--judge", "none",
                           "--no-hhh", "--no-toxicity", "--limit", "2", "--max-new-tokens", "4", "--out", str(out),
                           "--threads", "1", "--rl-metrics", "none", "--revisions", "none", "--kl-reference", "sl",
                           "--kl-temperature", "0"])
    b_greedy = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    b_greedy = [r for r in b_greedy if r["model"] == "b" and r["set"] == "red_team"]
    assert len(b_greedy) == 2 and all(r["temperature"] == 0.0 for r in b_greedy)
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), "cpu", torch.float32)
    ref_greedy = compare.response_token_logprobs(model.eval(), tok, b_greedy)
    model, tok, _ = load_model_and_tokenizer(str(tiny_setup["other"]), "cpu", torch.float32)
    own_greedy = compare.response_token_logprobs(model.eval(), tok, b_greedy)
    assert greedy["kl"]["models"]["b"]["mean"] == pytest.approx(kl_to_reference(own_greedy, ref_greedy)["mean"],
                                                                abs=1e-6)
    assert "responses are greedy" in (out / "report.md").read_text()
    with pytest.raises(MinicaiError, match="--kl-reference xx"):
        compare.main([f"sl={tiny_model_dir}", "--judge", "none", "--no-hhh", "--no-toxicity", "--pm", "none",
                      "--limit", "1", "--max-new-tokens", "2", "--out", str(out), "--kl-reference", "xx"])


def test_side_by_side_reading_is_computed_from_the_runs_numbers():
    """The report says what the comparison can and cannot show from this run's numbers: HHH accuracies whose
    interval contains chance, PM-score intervals that overlap the SL-CAI model's, greedy (not sampled) KL."""
    from minicai.report import side_by_side_reading

    def report(pm_hhh, sl_ci, dpo_ci, temperature=0.0):
        st = lambda lo, hi: {"n": 16, "mean": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}  # noqa: E731
        return {"pm": {"scores": {"red_team": {"sl": st(*sl_ci), "dpo": st(*dpo_ci)}}},
                "hhh": {"preference model": pm_hhh},
                "kl": {"reference": "sl", "set": "red_team", "temperature": temperature,
                       "models": {"dpo": {"mean": 1.0}}},
                "cost": {"dpo": {"seconds": 3.0, "peak_rss_mib": 100.0}}}

    weak = {"n": 100, "accuracy": 0.52, "ci_low": 0.42, "ci_high": 0.62}
    text = " ".join(side_by_side_reading(report(weak, (0.0, 1.0), (0.5, 1.5)), ["initial", "sl", "dpo"]))
    assert "the PM's HHH accuracy is 0.520 [0.42, 0.62]" in text and "carry little signal" in text
    assert "between `dpo` and `sl` on red_team: their 95% intervals overlap at n = 16 prompts" in text
    assert "responses are greedy" in text
    strong = {"n": 100, "accuracy": 0.81, "ci_low": 0.72, "ci_high": 0.88}
    text = " ".join(side_by_side_reading(report(strong, (0.0, 1.0), (2.0, 3.0), 1.0), ["initial", "sl", "dpo"]))
    assert "carry little signal" not in text and "greedy" not in text
    assert "`dpo` changed the PM score on red_team beyond the 95% interval of `sl`" in text
