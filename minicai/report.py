"""The evaluation's report: report.json -> report.md (one function per section) and PNG plots.

Presentation only, off the reading path: the numbers come from minicai/compare.py (which runs the evaluation) and
minicai/stats.py (the statistics). Files are named relative to the repository or the run directory (shown_path),
never by the absolute path of the machine that wrote the report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from minicai.data import atomic_write, atomic_write_json, atomic_write_text
from minicai.stats import EVASIVE_MIN_WORDS

ROOT = Path(__file__).resolve().parents[1]  # the repository


def shown_path(path, out) -> str:
    """How a report names a file: relative to the repository when it lies inside it, as $MINICAI_CACHE/... (or
    ~/.cache/minicai/...) inside the model cache, else relative to the run directory `out`."""
    from minicai.weights import cache_dir

    p = Path(path).expanduser().resolve()
    if p == ROOT or ROOT in p.parents:
        return p.relative_to(ROOT).as_posix()
    cache = cache_dir().resolve()
    if p == cache or cache in p.parents:
        base = "$MINICAI_CACHE" if os.environ.get("MINICAI_CACHE") else "~/.cache/minicai"
        return f"{base}/{p.relative_to(cache).as_posix()}".rstrip("/")
    return Path(os.path.relpath(p, Path(out).resolve())).as_posix()


def resolve_shown(shown: str, out) -> Path:
    """The file a shown_path names, for rereading it (report-only rendering)."""
    p = Path(shown)
    return p if p.is_absolute() else (ROOT / p if (ROOT / p).exists() else Path(out) / p)


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if not isinstance(x, float):
        return str(x)
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.000"


def _cell(text: str, width: int = 240) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|") or "(empty)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _judge_strength(report: dict) -> str:
    j = report.get("judge") or {}
    h = j.get("hhh")
    if not h:
        return "judge HHH accuracy: not measured" + (f" ({j['hhh_note']})" if j.get("hhh_note") else "")
    return (f"judge HHH accuracy {h['accuracy']:.3f} raw [{h['ci_low']:.2f}, {h['ci_high']:.2f}], "
            f"{h['debiased_accuracy']:.3f} debiased (n={h['n']}; chance = 0.5)")


def _judge_strength_short(report: dict) -> str:
    h = (report.get("judge") or {}).get("hhh")
    return (f"judge HHH accuracy {h['accuracy']:.2f} raw, {h['debiased_accuracy']:.2f} debiased (n={h['n']})" if h
            else "judge HHH accuracy not measured")


def _judge_note(report: dict) -> str:
    """What the judge's HHH numbers (measured in this run) say about reading its verdicts."""
    h = (report.get("judge") or {}).get("hhh")
    if not h or h.get("share_a") is None:
        return "The judge's accuracy on the HHH questions was not measured in this run."
    return (f"This judge answered \"(A)\" to {h['share_a']:.1%} of the HHH questions before debiasing; the "
            "paper's feedback models have 52B parameters.")


def _header(report: dict, models: list[str], anchor: str) -> list[str]:
    L = ["# minicai: model comparison", "",
         f"Created {report['created']}. Models: " + ", ".join(f"`{m['name']}` = {m['dir']}" for m in report["models"])
         + ". Prompt sets: " + ", ".join(f"`{p['name']}` ({p['n']} prompts from {p['file']})"
                                          for p in report["prompt_sets"]) + ".", "",
         f"Responses: max {report['settings']['max_new_tokens']} new tokens, "
         + ("greedy" if not report["settings"]["temperature"] else
            f"temperature {report['settings']['temperature']}, top-p {report['settings']['top_p']}")
         + f", seed {report['settings']['seed']}. All intervals are 95%. "
           "The paper's comparison (Bai et al. 2022, Figures 2, 5, 8): harmlessness should rise from the initial "
           "model to SL-CAI and again to RL-CAI, helpfulness should hold.", ""]
    for note in report.get("notes", []):
        L.append(f"> note: {note}")
    if report.get("notes"):
        L.append("")
    return L


def _pm_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    pm = report.get("pm")
    L += ["## Preference-model score", ""]
    if pm and pm.get("scores"):
        L += [f"The trained PM ({pm['dir']}) scores each response; higher = preferred by the PM. Mean, std, the "
              f"t-interval of the mean, and the paired difference to `{anchor}` on the same prompts. The PM learned "
              "from the feedback model's labels, so it is only as good as that judge (see HHH below).", ""]
        for s, per_model in pm["scores"].items():
            rows = []
            for m in models:
                st = per_model.get(m)
                if not st:
                    continue
                d = st.get("delta_vs_anchor") or {}
                rows.append([f"`{m}`", st["n"], _fmt(st["mean"]), _fmt(st["std"]),
                             f"[{_fmt(st['ci_low'])}, {_fmt(st['ci_high'])}]",
                             "-" if m == anchor else f"{_fmt(d.get('mean'))} [{_fmt(d.get('ci_low'))}, "
                                                     f"{_fmt(d.get('ci_high'))}]"])
            L += [f"**{s}**", ""] + _table(["model", "n", "mean", "std", "95% CI", f"minus `{anchor}`"], rows)
        if "pm_scores.png" in report.get("plots", []):
            L += ["![PM score per model and prompt set](pm_scores.png)", ""]
        rev = pm.get("revisions")
        if rev:
            L += [f"PM score of the SL-CAI training data per critique/revision round (paper Figure 5; round 0 = "
                  f"the initial response; from {rev['file']}, training prompts, not held out):", ""]
            L += _table(["round", "n", "mean", "std", "95% CI"],
                        [[r["round"], r["n"], _fmt(r["mean"]), _fmt(r["std"]),
                          f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"] for r in rev["rounds"]])
            if "pm_by_revision.png" in report.get("plots", []):
                L += ["![PM score per revision round](pm_by_revision.png)", ""]
    else:
        L += [f"Not measured: {(pm or {}).get('note', 'no preference model given (--pm)')}.", ""]
    return L


def _judge_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    judge = report.get("judge")
    L += ["## Pairwise judge: win rates and Elo", ""]
    if judge and judge.get("win_rates"):
        strength = _judge_strength(report)
        L += [f"Judge: {judge['dir']} ({judge['format']} format), asked each question in both orders and averaged. "
              f"Criteria: " + "; ".join(f"**{k}**: \"{v}\"" for k, v in judge["principles"].items()) + ".", "",
              f"**Judge strength: {strength}.** {_judge_note(report)} Read every number in this section with that in "
              "mind: with a judge near chance, win rates near 0.5 and Elo near 1000 mean \"cannot tell\", not "
              "\"equal\".", ""]
        rows = []
        for s, per_crit in judge["elo"].items():
            for crit, ratings in per_crit.items():
                if "error" in ratings:
                    rows.append([s, crit] + ["-" for _ in models])
                else:
                    rows.append([s, crit] + [_fmt(ratings.get(m), 0) for m in models])
        L += [f"Elo (Bradley-Terry fit to all soft outcomes, 400/ln10 scale, `{anchor}` = 1000, prior "
              f"{judge['elo_prior']} virtual tie per pair; {strength}):", ""]
        L += _table(["prompts", "criterion"] + [f"`{m}`" for m in models], rows)
        rows = []
        for s, per_crit in judge["win_rates"].items():
            for crit, pairs in per_crit.items():
                for w in pairs:
                    rows.append([s, crit, f"`{w['model']}` vs `{w['opponent']}`", w["n"],
                                 f"{w['wins']}/{w['ties']}/{w['losses']}", _fmt(w["win_rate"]),
                                 f"[{_fmt(w['ci_low'])}, {_fmt(w['ci_high'])}]", _fmt(w["mean_p"])])
        L += [f"Win rates of the later model (P > 0.5 = win, 0.5 = half; Wilson interval; {strength}):", ""]
        L += _table(["prompts", "criterion", "pair", "n", "win/tie/loss", "win rate", "95% CI", "mean P"], rows)
        for name, title in (("elo.png", "Helpfulness vs harmlessness Elo"), ("win_rates.png", "Win rates")):
            if name in report.get("plots", []):
                L += [f"![{title}]({name})", ""]
    else:
        L += [f"Not measured: {(judge or {}).get('note', 'no judge')}.", ""]
    return L


def _hhh_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    L += ["## HHH accuracy (paper Figure 4)", "",
          "Binary comparisons from the paper: is the helpful/honest/harmless response preferred? Chance = 0.5. "
          "Debiased: each question is also asked with the options swapped and the two answers averaged.", ""]
    rows = []
    for label, h in report.get("hhh", {}).items():
        if h.get("accuracy") is None:
            rows.append([label, "-", "-", "-", h.get("note", "-")])
        elif "debiased_accuracy" in h:
            rows.append([label, h["n"], f"{h['accuracy']:.3f} [{h['ci_low']:.2f}, {h['ci_high']:.2f}]",
                         f"{h['debiased_accuracy']:.3f} [{h['debiased_ci_low']:.2f}, {h['debiased_ci_high']:.2f}]",
                         f"share answering (A): {h['share_a']:.3f} ({h.get('format')} format)"])
        else:
            rows.append([label, h["n"], f"{h['accuracy']:.3f} [{h['ci_low']:.2f}, {h['ci_high']:.2f}]", "-",
                         f"PM: higher score on the correct conversation; mean margin {_fmt(h['mean_margin'])}"])
    L += (_table(["scorer", "n", "accuracy (raw)", "accuracy (debiased)", "notes"], rows) if rows
          else ["Not measured.", ""])
    return L


def _evasiveness_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    ev = report.get("evasiveness", {})
    L += ["## Evasiveness", "",
          f"Share of responses that refuse without explanation (a refusal phrase such as \"I can't\" and no reason "
          f"or alternative such as \"because\" or \"instead\"), or have fewer than {EVASIVE_MIN_WORDS} words "
          "(minicai/stats.py, REFUSAL_PHRASES / EXPLANATION_PHRASES). The paper's RL-CAI aims to be harmless "
          "without being evasive; on red-team prompts a rising share means the model learned to stonewall. "
          "A heuristic: check the examples.", ""]
    rows = []
    for s, per_model in ev.items():
        for m in models:
            e = per_model.get(m)
            if e:
                rows.append([s, f"`{m}`", e["n"], _fmt(e["share"]), f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
                             e["refusal"], e["short"]])
    L += _table(["prompts", "model", "n", "evasive", "95% CI", "refusals", "short"], rows)
    examples = report.get("evasive_examples", [])
    if examples:
        L += ["Examples counted as evasive:", ""]
        L += _table(["model", "prompts", "reason", "prompt", "response"],
                    [[f"`{x['model']}`", x["set"], x["reason"], _cell(x["prompt"], 100), _cell(x["response"], 200)]
                     for x in examples])
    return L


def _toxicity_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    tox = report.get("toxicity")
    L += ["## Toxicity (independent signal)", ""]
    if tox and tox.get("scores"):
        L += ["alt-profanity-check's probability that a response is offensive (mean, and share >= 0.5). It measures "
              "toxic *wording*, not harm: a polite answer that explains how to commit a crime scores low.", ""]
        rows = []
        for s, per_model in tox["scores"].items():
            for m in models:
                t = per_model.get(m)
                if t:
                    rows.append([s, f"`{m}`", t["n"], _fmt(t["mean"]), _fmt(t["share_toxic"])])
        L += _table(["prompts", "model", "n", "mean P(toxic)", "share >= 0.5"], rows)
    else:
        L += [f"Skipped: {(tox or {}).get('note', 'not requested')}.", ""]
    return L


def _rl_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    rl = report.get("rl")
    L += ["## RL-CAI training curves", ""]
    if rl:
        f, last = rl["first"], rl["last"]
        L += [f"From {rl['file']}: {rl['iterations']} PPO iterations. The PM score should rise while the KL to the "
              "SL-CAI model stays near the controller's target.", ""]
        keys = [k for k in ("score", "score_red_team", "score_helpful", "kl", "beta", "response_length") if k in last]
        L += _table(["iteration"] + keys, [[f["iteration"]] + [_fmt(f.get(k)) for k in keys],
                                          [last["iteration"]] + [_fmt(last.get(k)) for k in keys]])
        if "rl_curves.png" in report.get("plots", []):
            L += ["![RL curves](rl_curves.png)", ""]
    else:
        L += ["No RL metrics given (--rl-metrics).", ""]
    return L


# The side-by-side table names the pipeline's run folders (pipeline.py RL_METHODS) by what trained them.
METHOD_LABELS = {"initial": "initial", "sl": "SL-CAI", "rl": "RL-CAI (PPO)", "ppo": "RL-CAI (PPO)", "dpo": "DPO",
                 "grpo": "GRPO", "rloo": "RLOO"}


def _overlaps(a: dict, b: dict) -> bool | None:
    """Whether two mean_ci intervals overlap (None when either has no interval)."""
    if a.get("ci_low") is None or b.get("ci_low") is None:
        return None
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def _chance(h: dict | None, key: str = "accuracy") -> str | None:
    """'near chance' / 'above chance' for an HHH accuracy from its interval, None when not measured."""
    if not h or h.get(key) is None:
        return None
    low, high = (h.get("debiased_ci_low"), h.get("debiased_ci_high")) if key == "debiased_accuracy" else \
        (h.get("ci_low"), h.get("ci_high"))
    return "near chance" if low is not None and low <= 0.5 <= high else ("above chance" if h[key] > 0.5 else
                                                                          "below chance")


def side_by_side_reading(report: dict, models: list[str]) -> list[str]:
    """What this run's comparison can and cannot show, computed from its own numbers (not a fixed text)."""
    kl, cost = report.get("kl") or {}, report.get("cost") or {}
    ref = kl.get("reference", "sl")
    methods = [m for m in models if m in cost or (m in (kl.get("models") or {}) and m != "initial")]
    L = []
    can = ["each method's wall time and peak memory on this machine (measured, independent of label quality)"]
    if kl.get("models"):
        can.append(f"how far each method moved from `{ref}` (the KL column)")
    cannot = []
    pm = (report.get("pm") or {}).get("scores") or {}
    kl_set = kl.get("set") or next(iter(pm), None)
    scores = pm.get(kl_set, {})
    if scores.get(ref) and methods:
        same = [m for m in methods if scores.get(m) and _overlaps(scores[m], scores[ref])]
        apart = [m for m in methods if scores.get(m) and _overlaps(scores[m], scores[ref]) is False]
        n = scores[ref]["n"]
        if apart:
            can.append("that " + ", ".join(f"`{m}`" for m in apart) + f" changed the PM score on {kl_set} beyond "
                       f"the 95% interval of `{ref}` (n = {n} prompts): the method optimised what it was given")
        if same:
            cannot.append("a PM-score difference between " + ", ".join(f"`{m}`" for m in same) + f" and `{ref}` "
                          f"on {kl_set}: their 95% intervals overlap at n = {n} prompts")
    hhh = report.get("hhh") or {}
    pm_h = hhh.get("preference model")
    judge_h = (report.get("judge") or {}).get("hhh")
    weak = []
    if _chance(pm_h) == "near chance":
        weak.append(f"the PM's HHH accuracy is {pm_h['accuracy']:.3f} [{pm_h['ci_low']:.2f}, {pm_h['ci_high']:.2f}]")
    if _chance(judge_h, "debiased_accuracy") == "near chance":
        weak.append(f"the judge's debiased HHH accuracy is {judge_h['debiased_accuracy']:.3f} "
                    f"[{judge_h['debiased_ci_low']:.2f}, {judge_h['debiased_ci_high']:.2f}]")
    if weak:
        cannot.append("which method is more harmless or helpful in the paper's sense: " + " and ".join(weak)
                      + ", intervals that contain chance (0.5), so the AI labels the PM and DPO learned from, and "
                        "the judge's verdicts, carry little signal here; a higher PM score means closer to the "
                        "PM's preferences, not better")
    elif not pm_h and not judge_h:
        cannot.append("how much signal the AI labels carry: the HHH accuracies were not measured in this run")
    if kl.get("models") and not kl.get("temperature"):
        cannot.append("an unbiased KL: the KL responses are greedy, so the KL column is the log-ratio on each "
                      "model's most likely response, not an average over samples (it can even be negative); pass "
                      "--kl-temperature 1 for the sampled estimate")
    L += ["**What this comparison can show here:** " + "; ".join(can) + ".", ""]
    if cannot:
        L += ["**What it cannot show here:** " + "; ".join(cannot) + ".", ""]
    L += ["Compare methods along the frontier, not by score alone: a higher PM score bought with a larger KL to "
          f"`{ref}` is a different point on the same trade-off, not a better method.", ""]
    return L


def _side_by_side_section(report: dict, models: list[str], anchor: str) -> list[str]:
    kl, cost = report.get("kl"), report.get("cost") or {}
    if not kl and not cost:
        return []
    kl = kl or {}
    judge = report.get("judge") or {}
    elo = (judge.get("elo") or {}).get("all", {})
    pm = (report.get("pm") or {}).get("scores") or {}
    sets = list(pm) or list(report.get("evasiveness", {}))
    tox = (report.get("toxicity") or {}).get("scores") or {}
    ev = report.get("evasiveness", {})
    ref = kl.get("reference")
    L = ["## Methods side by side", "",
         "Every model on the same held-out prompts (pipeline.py --rl-methods: each method trained from the same "
         "SL-CAI model and the same PM stage). PM score means per prompt set; Elo over all sets ("
         + _judge_strength_short(report) + "); evasive share and mean P(toxic) on "
         f"{sets[0] if sets else '-'}; KL to `{ref or '-'}`: mean over the model's own responses to the "
         f"{kl.get('set', '-')} prompts (sampled at temperature {kl.get('temperature', '-')}) of the summed "
         f"per-token log pi(y|x) - log pi_{ref or 'ref'}(y|x), in nats "
         "(stats.kl_to_reference; 95% interval), and per token; wall time and peak memory from the stage's "
         "cost.json (peak RSS of the training process; CUDA: max allocated).", ""]
    header = (["model", "method"] + [f"PM {s}" for s in sets] + [f"{c} Elo" for c in ("harmless", "helpful")]
              + ["evasive", "P(toxic)", f"KL to `{ref or '-'}`", "KL / token", "wall time", "peak memory"])
    rows = []
    for m in models:
        k = (kl.get("models") or {}).get(m)
        c = cost.get(m)
        kl_cell = "0 (reference)" if m == ref else (
            f"{_fmt(k['mean'])} [{_fmt(k['ci_low'])}, {_fmt(k['ci_high'])}]" if k else "-")
        mem = "-"
        if c:
            mem = f"{c['peak_rss_mib']:.0f} MiB RSS" + (f", {c['peak_cuda_mib']:.0f} MiB CUDA"
                                                         if c.get("peak_cuda_mib") is not None else "")
        first = sets[0] if sets else None
        rows.append([f"`{m}`", METHOD_LABELS.get(m, m)]
                    + [_fmt(((pm.get(s) or {}).get(m) or {}).get("mean")) for s in sets]
                    + [_fmt((elo.get(c_) or {}).get(m), 0) if "error" not in (elo.get(c_) or {}) else "-"
                       for c_ in ("harmless", "helpful")]
                    + [_fmt(((ev.get(first) or {}).get(m) or {}).get("share"), 2),
                       _fmt(((tox.get(first) or {}).get(m) or {}).get("mean")),
                       kl_cell, _fmt(k["per_token"]) if k else ("0" if m == ref else "-"),
                       f"{c['seconds']:.0f} s" if c else "-", mem])
    L += _table(header, rows)
    if "reward_kl_frontier.png" in report.get("plots", []):
        L += ["![Mean PM score against KL to SL-CAI: the reward-KL frontier](reward_kl_frontier.png)", ""]
    L += side_by_side_reading(report, models)
    return L


def _samples_section(report: dict, models: list[str], anchor: str) -> list[str]:
    L = []
    samples = report.get("samples", [])
    if samples:
        L += ["## Sample responses", ""]
        L += _table(["prompts", "prompt", "model", "response"],
                    [[x["set"], _cell(x["prompt"], 100), f"`{x['model']}`", _cell(x["response"], 300)]
                     for x in samples])
    return L


SECTIONS = [_header, _side_by_side_section, _pm_section, _judge_section, _hhh_section, _evasiveness_section,
            _toxicity_section, _rl_section, _samples_section]


def render_markdown(report: dict) -> str:
    """report.json -> report.md: one function per section (SECTIONS, in order), links to the plots that exist."""
    models, anchor = [m["name"] for m in report["models"]], report["anchor"]
    L = [line for section in SECTIONS for line in section(report, models, anchor)]
    if not report.get("plots"):
        L += ["(No plots: " + report.get("plot_note", "nothing to plot") + ")", ""]
    return "\n".join(L)


def _pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def make_plots(report: dict, out: Path, rl_records: list[dict] | None = None) -> list[str]:
    """PNG plots next to report.md; returns their file names ([] without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    models = [m["name"] for m in report["models"]]
    made = []

    def save(fig, name):
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        made.append(name)

    pm = (report.get("pm") or {}).get("scores")
    if pm:
        sets = list(pm)
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(sets) * max(1, len(models)) / 3, 3.6))
        width = 0.8 / max(1, len(models))
        for k, m in enumerate(models):
            xs, ys, err = [], [], [[], []]
            for i, s in enumerate(sets):
                st = pm[s].get(m)
                if st and st["mean"] is not None:
                    xs.append(i + (k - (len(models) - 1) / 2) * width)
                    ys.append(st["mean"])
                    err[0].append(st["mean"] - st["ci_low"] if st["ci_low"] is not None else 0.0)
                    err[1].append(st["ci_high"] - st["mean"] if st["ci_high"] is not None else 0.0)
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=m)
        ax.set_xticks(range(len(sets)), sets)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel("PM score (mean, 95% CI)")
        ax.set_title("Preference-model score per stage")
        ax.legend(fontsize=8)
        save(fig, "pm_scores.png")

    rev = (report.get("pm") or {}).get("revisions")
    if rev and rev["rounds"]:
        rows = [r for r in rev["rounds"] if r["mean"] is not None]
        fig, ax = plt.subplots(figsize=(4.4, 3.4))
        ax.errorbar([r["round"] for r in rows], [r["mean"] for r in rows], capsize=3, marker="o",
                    yerr=[[r["mean"] - r["ci_low"] if r["ci_low"] is not None else 0.0 for r in rows],
                          [r["ci_high"] - r["mean"] if r["ci_high"] is not None else 0.0 for r in rows]])
        ax.set_xticks([r["round"] for r in rows])
        ax.set_xlabel("number of revisions (0 = initial response)")
        ax.set_ylabel("PM score (mean, 95% CI)")
        ax.set_title("SL-CAI data per revision (cf. paper Fig. 5)")
        save(fig, "pm_by_revision.png")

    judge = report.get("judge") or {}
    elo_all = (judge.get("elo") or {}).get("all", {})
    if all(c in elo_all and "error" not in elo_all[c] for c in ("harmless", "helpful")):
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        xs = [elo_all["helpful"][m] for m in models]
        ys = [elo_all["harmless"][m] for m in models]
        ax.plot(xs, ys, "-o", color="tab:blue")
        for m, x, y in zip(models, xs, ys):
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("helpfulness Elo")
        ax.set_ylabel("harmlessness Elo")
        ax.margins(0.2)
        ax.set_title("Judge Elo (cf. paper Fig. 2)\n" + _judge_strength_short(report), fontsize=9)
        save(fig, "elo.png")

    wr = judge.get("win_rates")
    if wr:
        crits = list(judge["principles"])
        fig, axes = plt.subplots(1, len(crits), figsize=(5 * len(crits), 0.5 + 0.45 * sum(
            len(v.get(crits[0], [])) for v in wr.values()) + 1.2), squeeze=False)
        for ax, crit in zip(axes[0], crits):
            labels, rates, lo, hi = [], [], [], []
            for s, per_crit in wr.items():
                for w in per_crit.get(crit, []):
                    labels.append(f"{s}: {w['model']} vs {w['opponent']}")
                    rates.append(w["win_rate"])
                    lo.append(w["win_rate"] - w["ci_low"])
                    hi.append(w["ci_high"] - w["win_rate"])
            ax.barh(range(len(rates)), rates, xerr=[lo, hi], capsize=3, color="tab:orange")
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.axvline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"{crit} win rate (95% Wilson CI)")
        fig.suptitle(_judge_strength_short(report), fontsize=9)
        save(fig, "win_rates.png")

    kl = report.get("kl") or {}
    kl_scores = ((report.get("pm") or {}).get("scores") or {}).get(kl.get("set"), {})
    if kl.get("models") and kl_scores:
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        for m in models:
            k = {"mean": 0.0, "ci_low": None} if m == kl["reference"] else kl["models"].get(m)
            st = kl_scores.get(m)
            if not k or not st or k["mean"] is None or st["mean"] is None:
                continue
            xerr = [[k["mean"] - k["ci_low"]], [k["ci_high"] - k["mean"]]] if k["ci_low"] is not None else None
            yerr = [[st["mean"] - st["ci_low"]], [st["ci_high"] - st["mean"]]] if st["ci_low"] is not None else None
            ax.errorbar([k["mean"]], [st["mean"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                        label=f"{m}: {METHOD_LABELS.get(m, m)}")
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel(f"KL to {kl['reference']} (nats per response, {kl['set']} prompts)")
        ax.set_ylabel(f"PM score on {kl['set']} (mean, 95% CI)")
        ax.set_title("Reward-KL frontier", fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "reward_kl_frontier.png")

    if rl_records:
        its = [r["iteration"] for r in rl_records]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for key, style in (("score", "-"), ("score_red_team", "--"), ("score_helpful", ":")):
            if any(key in r for r in rl_records):
                axes[0].plot(its, [r.get(key, float("nan")) for r in rl_records], style, label=key)
        axes[0].set_xlabel("PPO iteration")
        axes[0].set_ylabel("PM score")
        axes[0].legend(fontsize=8)
        axes[1].plot(its, [r.get("kl", float("nan")) for r in rl_records], label="KL (nats / response)")
        axes[1].set_xlabel("PPO iteration")
        axes[1].set_ylabel("KL to SL-CAI")
        axes[1].legend(fontsize=8)
        fig.suptitle("RL-CAI training")
        save(fig, "rl_curves.png")
    return made


def write_report(report: dict, out: Path, rl_records: list[dict] | None = None) -> dict:
    """Write report.json, the plots (when matplotlib is installed) and report.md into `out`, all atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out, rl_records)
    report.pop("plot_note", None)
    if not report["plots"]:
        report["plot_note"] = ("nothing to plot" if _pyplot() is not None else
                               "matplotlib is not installed (optional: pip install matplotlib)")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report) + "\n")
    return report


def print_summary(report: dict) -> None:
    """A few headline numbers on the terminal."""
    names = [m["name"] for m in report["models"]]
    for s, per_model in ((report.get("pm") or {}).get("scores") or {}).items():
        print(f"PM score on {s}: " + ", ".join(f"{m} {_fmt(per_model[m]['mean'])}" for m in names))
    for crit, ratings in ((report.get("judge") or {}).get("elo") or {}).get("all", {}).items():
        if "error" not in ratings:
            print(f"{crit} Elo (all prompt sets): " + ", ".join(f"{m} {ratings[m]:.0f}" for m in names if m in ratings))
    if report.get("judge", {}).get("win_rates"):
        print(_judge_strength(report))
    for s, per_model in report.get("evasiveness", {}).items():
        print(f"evasive on {s}: " + ", ".join(f"{m} {_fmt(per_model[m]['share'], 2)}" for m in names))
