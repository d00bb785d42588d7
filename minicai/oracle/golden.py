"""Golden vectors: small cases (B <= 4, T <= 8, V <= 16) with the expected float64 output under every profile.

Each case is one JSON file: id, function, description, inputs, params, expected {variant: {output: value}},
tolerance (a class of check.TOLERANCES), catches (the public bugs it would have caught). Floats are written with
Python's repr, which reads back to the same float64; nan and +-inf, which JSON lacks, are the strings "nan", "inf",
"-inf". `python3 -m minicai.oracle generate DIR` writes them; regenerating gives the same bytes on the same CPU, and on
another the float64 values to a few units in the last place (torch's vectorised exp/log kernels for AVX2 and AVX-512
round differently; the "exact" tolerance class allows 1e-12).

Variants are profiles (conventions.PROFILES) for the convention-dependent stages, and mode or estimator names for the
aggregation and group-baseline cases. A profile that does not advertise a KL name has no entry for it.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minicai import losses as L
from minicai.data import atomic_write_text
from minicai.oracle import reference as R
from minicai.oracle.conventions import PROFILES, Convention

D = torch.float64
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


def encode(x: Any) -> Any:
    """Tensors and floats to JSON-ready lists; non-finite floats to strings."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if isinstance(x, dict):
        return {k: encode(v) for k, v in x.items()}
    return x


def decode(x: Any) -> Any:
    """Inverse of encode for values (the strings "nan", "inf", "-inf" become floats)."""
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, list):
        return [decode(v) for v in x]
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    return x


def dumps(case: dict) -> str:
    return json.dumps(encode(case), indent=1, sort_keys=True, allow_nan=False) + "\n"


def tensor(x: Any, dtype=D) -> Tensor:
    return torch.tensor(decode(x), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Running one stage of one case under one variant


def signed_penalty(conv: Convention, magnitude: float) -> float:
    """The truncation penalty each convention is configured with for a penalty of `magnitude` (> 0): minicai adds a
    negative one, TRL subtracts a positive one, lm-human-preferences replaces the score with a negative one."""
    return magnitude if conv.missing_eos == "subtract" else -magnitude


def run(function: str, variant: str, inputs: dict, params: dict) -> dict:
    """The outputs of `function` under `variant`; {"error": "ValueError"} when the variant refuses the inputs."""
    x = {k: tensor(v, torch.long if k in ("ids", "tokens", "truncated") else D) for k, v in inputs.items()}
    try:
        return {k: v for k, v in _run(function, variant, x, params).items()}
    except ValueError:
        return {"error": "ValueError"}


def _run(function: str, variant: str, x: dict, p: dict) -> dict:
    if function == "aggregate":
        return {"loss": L.aggregate_loss(x["per_token"], x["mask"], variant, p.get("constant"))}
    if function == "aggregate_split":
        whole = L.aggregate_loss(x["per_token"], x["mask"])
        n = float(x["mask"].sum())
        out = {"whole": whole}
        for k, split in enumerate(p["splits"]):
            parts = zip(x["per_token"].split(split), x["mask"].split(split))
            out[f"split{k}_global"] = sum(L.aggregate_loss(a, m, global_tokens=n) for a, m in parts)
            parts = zip(x["per_token"].split(split), x["mask"].split(split))
            out[f"split{k}_local_mean"] = sum(L.aggregate_loss(a, m) for a, m in parts) / len(split)
        return out
    if function == "group_advantages":
        return {"advantages": R.group_advantages(x["scores"], variant)}
    if function == "shifted_logprobs":
        return {"logprobs": L.sequence_logprobs(x["logits"], x["ids"])}
    if function == "dpo_sequence_logprobs":  # log pi(y|x): the response tokens' log-probs, summed (train_dpo.py)
        return {"logprobs": L.masked_sum(L.sequence_logprobs(x["logits"], x["ids"]), x["response_mask"][:, 1:], 1)}
    if function == "dpo":
        return _dpo(variant, x, p)
    conv = PROFILES[variant]
    if function == "response_mask":
        return {"mask": R.response_mask(conv, x["ids"], p["eos_id"], p["pad_id"])}
    if function == "logprobs":
        return {"logprobs": R.logprobs(conv, x["logits"], x["tokens"], p["temperature"])}
    if function == "entropy":
        if conv.entropy_logits == "none":
            raise ValueError(f"{conv.name} computes no entropy")
        return {"entropy": R.entropy_tokens(conv, x["logits"], p["temperature"])}
    if function == "kl":
        return {f"kl[{name}]": R.kl(conv, x["logp"], x["ref_logp"], name) for name, _ in conv.kl_names
                if name != "full"}
    if function == "token_rewards":
        truncated = x.get("truncated")
        pen = signed_penalty(conv, p.get("penalty_magnitude", 0.0))
        return {"rewards": R.token_rewards(conv, x["score"], x["kl"], x["mask"], p["beta"], truncated, pen)}
    if function == "advantages":
        adv, ret = R.advantages(conv, x["rewards"], x["values"], x["mask"], p["gamma"], p["lam"])
        return {"advantages": adv, "returns": ret}
    if function == "whiten":
        return {"whitened": R.whiten(conv, x["x"], x["mask"])}
    if function == "policy_loss":
        per_tok, clipped = R.policy_loss_tokens(conv, x["logp"], x["old_logp"], x["adv"], x["mask"], p["clip"])
        m = x["mask"]
        return {"per_token": torch.where(m.bool(), per_tok, torch.zeros((), dtype=D)),
                "loss": R.aggregate(conv, per_tok, m), "clipfrac": L.masked_mean(clipped, m)}
    if function == "value_loss":
        return {"loss": R.value_loss(conv, x["values"], x["old_values"], x["returns"], x["mask"], p.get("clip"))}
    if function == "adaptive_kl_measure":
        if conv.adaptive_kl_input == "fixed":
            raise ValueError(f"{conv.name} has no adaptive KL controller")
        return {"kl": R.adaptive_kl_measure(conv, x["kl"], x["mask"])}
    raise ValueError(f"unknown golden function {function!r}")


DPO_VARIANTS = ["soft", "hard", "soft-cdpo", "hard-cdpo"]


def _dpo(variant: str, x: dict, p: dict) -> dict:
    """losses.py's DPO functions on one batch of pairs. Labels: "soft" the p_a given (the paper's PM targets),
    "hard" p_a rounded to 0/1 with the pairs labelled 0.5 left out (train_dpo.hard_labels); "-cdpo" adds label
    smoothing p["label_smoothing"] (conservative DPO). The implicit rewards and h do not depend on the labels."""
    la, lb, ra, rb, pa = x["logp_a"], x["logp_b"], x["ref_logp_a"], x["ref_logp_b"], x["p_a"]
    r_a, r_b = L.dpo_implicit_rewards(la, ra, p["beta"]), L.dpo_implicit_rewards(lb, rb, p["beta"])
    out = {"log_ratio_difference": L.dpo_log_ratio_difference(la, lb, ra, rb), "rewards_a": r_a, "rewards_b": r_b}
    if variant.startswith("hard"):
        keep = pa != 0.5
        if not bool(keep.any()):
            raise ValueError("no pair carries a preference")
        la, lb, ra, rb, r_a, r_b, pa = la[keep], lb[keep], ra[keep], rb[keep], r_a[keep], r_b[keep], pa[keep]
        pa = (pa > 0.5).to(D)
    eps = p["label_smoothing"] if variant.endswith("-cdpo") else 0.0
    out["loss"] = L.dpo_loss(la, lb, ra, rb, pa, p["beta"], eps)
    out["reward_margin"] = L.reward_margin(r_a, r_b, pa)
    out["accuracy"] = L.preference_accuracy(r_a, r_b, pa)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The cases

G = 1e30  # garbage at masked positions: must not reach any result of a convention that masks

RAGGED_MASK = [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
PROFILE_NAMES = list(PROFILES)
ALL_KL_NAMES = sorted({name for c in PROFILES.values() for name, _ in c.kl_names if name != "full"})


def _cases() -> list[dict]:
    c: list[dict] = []

    def add(id_, function, description, inputs, params=None, variants=None, tolerance="exact", catches=()):
        c.append({"id": id_, "function": function, "description": description, "inputs": inputs,
                  "params": params or {}, "variants": list(variants or PROFILE_NAMES), "tolerance": tolerance,
                  "catches": list(catches)})

    # 1. unequal right padding
    add("rewards-unequal-right-padding", "token_rewards",
        "Score placement, KL masking and score clips (12 > 10 > 5) with rows of lengths 4, 2, 6 (full) and 1.",
        {"score": [1.0, -2.0, 0.5, 12.0], "kl": [[0.1, -0.2, 0.3, 0.05, G, G], [0.2, 0.1, G, G, G, G],
                                                [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.7, G, G, G, G, G]],
         "mask": RAGGED_MASK}, {"beta": 0.1}, catches=["trl#1893", "trl#3750", "DeepSpeedExamples#672"])
    add("gae-unequal-right-padding", "advantages", "GAE with gamma 1, lambda 0.95 over ragged rows.",
        {"rewards": [[0.0, 0.1, 0.0, 1.0, 0.0, 0.0], [0.5, -1.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.1, 0.0, 0.0, 2.0], [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0]],
         "values": [[0.2, 0.3, 0.1, 0.4, 5.0, 6.0], [0.1, -0.3, 7.0, 8.0, 9.0, 1.0],
                    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 3.0, 3.0, 3.0, 3.0, 3.0]], "mask": RAGGED_MASK},
        {"gamma": 1.0, "lam": 0.95}, catches=["verl#50", "verl#1850", "ROLL#447", "alpaca-rlhf#9"])
    add("whiten-unequal-right-padding", "whiten", "Advantage whitening over ragged rows (biased vs unbiased).",
        {"x": [[1.0, 2.0, 0.5, -1.0, G, G], [3.0, 0.0, G, G, G, G], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
               [-2.0, G, G, G, G, G]], "mask": RAGGED_MASK}, catches=["trl#153", "trl#1540"])
    per_token = [[1.0, 2.0, 3.0, 4.0, G, G], [5.0, 6.0, G, G, G, G], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                 [9.0, G, G, G, G, G]]
    add("aggregate-every-mode", "aggregate", "Every loss aggregation mode on ragged rows (constant = 6).",
        {"per_token": per_token, "mask": RAGGED_MASK}, {"constant": 6.0}, variants=L.AGG_MODES,
        catches=["verl#3741", "trl#6654", "trl#3138", "trl#3256"])
    add("aggregate-micro-batch-split", "aggregate_split",
        "One batch split into micro-batches two ways: the global token mean is the same, the mean of local means "
        "is not.", {"per_token": per_token, "mask": RAGGED_MASK}, {"splits": [[2, 2], [1, 3]]},
        variants=["token-mean"], catches=["verl#5625", "trl#6024", "trl#3231", "ms-swift#10117"])
    # 2. full length without EOS, and the missing-EOS penalty
    add("rewards-full-length-no-eos", "token_rewards",
        "Row 0 fills all 4 slots without EOS (truncated, penalty magnitude 1); row 1 ends early.",
        {"score": [2.0, 2.0], "kl": [[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, G, G]], "mask": [[1, 1, 1, 1], [1, 1, 0, 0]],
         "truncated": [1, 0]}, {"beta": 0.5, "penalty_magnitude": 1.0}, catches=["trl#3750"])
    # 3. pad == eos
    add("mask-pad-equals-eos", "response_mask", "pad id == eos id == 2: does the EOS count as a response token?",
        {"ids": [[5, 6, 2, 2, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]]}, {"eos_id": 2, "pad_id": 2},
        catches=["trl#5303", "DeepSpeedExamples#672"])
    add("mask-pad-differs-from-eos", "response_mask", "eos 2, pad 0.",
        {"ids": [[5, 6, 2, 0, 0], [5, 2, 0, 0, 0], [5, 6, 7, 8, 9]]}, {"eos_id": 2, "pad_id": 0})
    # 4. interior hole
    add("gae-interior-hole", "advantages", "A masked slot inside a row (gamma 1, lambda 0.5): end / zero / skip.",
        {"rewards": [[0.0, 1.0, G, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]],
         "values": [[0.5, 0.5, G, 0.5, 0.0], [0.1, 0.2, 0.3, 0.0, 0.0]],
         "mask": [[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]]}, {"gamma": 1.0, "lam": 0.5},
        catches=["verl#2337", "miles#1827"])
    # 5. huge and nan values at masked positions
    add("gae-nan-at-masked", "advantages", "nan and inf rewards and values after the last valid token.",
        {"rewards": [[0.0, 1.0, NAN, NAN], [1.0, 0.0, 0.0, 0.0]], "values": [[0.0, 0.0, 100.0, INF],
                                                                             [0.5, 0.1, 0.2, 0.3]],
         "mask": [[1, 1, 0, 0], [1, 1, 1, 1]]}, {"gamma": 1.0, "lam": 0.95}, catches=["ROLL#447", "verl#50"])
    add("policy-loss-nan-at-masked", "policy_loss", "nan log-probs and huge advantages at masked slots.",
        {"logp": [[-1.0, -2.0, NAN], [-0.5, NAN, NAN]], "old_logp": [[-1.1, -1.9, NAN], [-0.5, -INF, 0.0]],
         "adv": [[1.0, -1.0, G], [2.0, G, -G]], "mask": [[1, 1, 0], [1, 0, 0]]}, {"clip": 0.2},
        catches=["verl#1850"])
    # 6. an all-masked row, and a single valid token
    add("whiten-single-valid-token", "whiten", "One valid token: Bessel's n - 1 = 0.",
        {"x": [[3.0, G], [G, G]], "mask": [[1, 0], [0, 0]]}, catches=["ROLL#475"])
    add("whiten-all-masked-row", "whiten", "Row 1 has no valid token; the statistics come from row 0.",
        {"x": [[1.0, 2.0, 4.0], [G, G, G]], "mask": [[1, 1, 1], [0, 0, 0]]}, catches=["verl#6310"])
    add("rewards-all-masked-row", "token_rewards", "A zero-length response has no slot for the score.",
        {"score": [1.0, 5.0], "kl": [[0.0, 0.0], [0.0, 0.0]], "mask": [[1, 1], [0, 0]]}, {"beta": 0.1},
        catches=["verl#6310", "OpenRLHF#1239"])
    add("group-every-estimator", "group_advantages",
        "GRPO/RLOO/Dr. GRPO advantages; group 1 is all equal, group 2 has two samples.",
        {"scores": [[1.0, 2.0, 6.0, 3.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 0.5, 0.25]]},
        variants=list(R.GROUP_ESTIMATORS), catches=["verl#6310", "OpenRLHF#1239", "tinker-cookbook#579"])
    add("group-single-sample", "group_advantages", "G = 1: no spread, and no leave-one-out baseline.",
        {"scores": [[5.0], [-2.0]]}, variants=list(R.GROUP_ESTIMATORS), catches=["verl#6310"])
    # 7. log-ratios of 11 and 25 (clamps), and every advertised KL name; 10. tiny differences
    add("kl-log-ratio-11-and-25", "kl",
        "d = +-11, +-25 and +-10.5: OpenRLHF clamps the estimate at 10 (and k3's d below at -10), verl d at 20.",
        {"logp": [[-1.0, -26.0, -12.0, -30.0, -1.0, -11.5]], "ref_logp": [[-12.0, -1.0, -1.0, -5.0, -11.5, -1.0]]},
        catches=["OpenRLHF d90b3d1f", "verl#6058", "verl#2953"])
    add("kl-tiny-differences", "kl", "d = 1e-4 .. 1e-9: k3 = exp(-d) - 1 + d cancels in float32/bf16.",
        {"logp": [[-1.0001, -2.00001, -0.5000001, -3.000000001]], "ref_logp": [[-1.0, -2.0, -0.5, -3.0]]},
        catches=["OpenRLHF#620", "OpenRLHF#634", "marin#4620"])
    add("policy-loss-log-ratio-25", "policy_loss", "ratio exp(25): OpenRLHF and verl clamp the log-ratio at 20.",
        {"logp": [[-1.0, -1.0]], "old_logp": [[-26.0, 24.0]], "adv": [[-1.0, 1.0]], "mask": [[1, 1]]},
        {"clip": 0.2})
    # 8. dual-clip
    add("policy-loss-dual-clip", "policy_loss",
        "A < 0 with ratio 4 (verl's dual-clip caps at c = 3); ratio 1.5 with A < 0 (unclipped term binds).",
        {"logp": [[math.log(4.0), math.log(1.5), math.log(0.5), 0.0]], "old_logp": [[0.0, 0.0, 0.0, 0.0]],
         "adv": [[-1.0, -1.0, -1.0, 2.0]], "mask": [[1, 1, 1, 1]]}, {"clip": 0.2},
        catches=["tianshou#433", "verl#784", "PPOxFamily#95"])
    add("value-loss-both-clips", "value_loss", "Value clip active above and below (clip 0.2 and 0.5 profiles).",
        {"values": [[0.5, 0.5, 0.1, -0.5, -0.5, G]], "old_values": [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],
         "returns": [[1.0, 0.0, 1.0, -1.0, 0.0, 0.0]], "mask": [[1, 1, 1, 1, 1, 0]]})
    # 9. temperature 0.7 with logits near 30 and a -inf logit
    logits = [[[30.0, 29.5, -INF, 0.0, 28.0, 1.0, -3.0, 30.25], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]],
              [[-INF, 12.0, 11.0, 30.0, 29.0, 0.0, -1.0, 2.0], [29.9, 30.0, 29.8, -INF, -INF, 0.0, 0.0, 0.0]]]
    add("logprobs-temperature-0.7", "logprobs", "T = 0.7, logits near 30 and -inf (masked vocabulary).",
        {"logits": logits, "tokens": [[7, 3], [3, 1]]}, {"temperature": 0.7},
        catches=["trl#4159", "OpenRLHF#853", "verl#3133", "trl#3169"])
    add("entropy-temperature-0.7", "entropy", "Entropy of the tempered (or raw) distribution, same logits.",
        {"logits": logits}, {"temperature": 0.7}, catches=["OpenRLHF#1319", "trl#2022"])
    # 11. the off-by-one trap: each position's argmax is the token after it
    shift_logits = [[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0] for _ in range(5)]]
    for pos, tok in enumerate([3, 1, 4, 1, 5]):
        shift_logits[0][pos][tok] = 8.0  # position pos predicts ids[pos + 1]
    add("logprobs-shift-by-one", "shifted_logprobs",
        "Logits at position t predict token t + 1 (log-prob near 0); a same-position read gives about -8.",
        {"logits": shift_logits, "ids": [[2, 3, 1, 4, 1]]}, variants=["any"],
        catches=["maxtext#2103", "mlx-lm-lora#80", "PaLM-rlhf-pytorch#31"])
    add("adaptive-kl-input", "adaptive_kl_measure", "Per-sequence sum vs per-sequence token mean of the KL.",
        {"kl": [[0.1, 0.2, 0.3, G], [0.4, G, G, G]], "mask": [[1, 1, 1, 0], [1, 0, 0, 0]]})
    # 12. DPO (Rafailov et al. 2023) on labelled pairs: the loss under soft, hard and smoothed labels, the implicit
    # rewards, margin and accuracy, and the sequence log-probs they take
    def pairs(logp_a, logp_b, ref_logp_a, ref_logp_b, p_a) -> dict:  # one entry per pair: [B] each
        return {"logp_a": logp_a, "logp_b": logp_b, "ref_logp_a": ref_logp_a, "ref_logp_b": ref_logp_b, "p_a": p_a}

    add("dpo-labels-ties-and-underflow", "dpo",
        "Pair 1 has beta*h = -800 (sigmoid underflows to 0 in float64: log(sigmoid) gives inf, logsigmoid 160); "
        "pair 2 is labelled 0.5 (in the soft loss, out of the hard one and of accuracy and margin); pair 3 ties "
        "(r_A == r_B, counted wrong).",
        pairs([-12.0, -8010.0, -7.25, -20.0], [-15.5, -9.0, -6.0, -4.0], [-13.0, -10.0, -7.25, -21.0],
              [-14.0, -9.0, -6.0, -5.0], [0.9, 0.2, 0.5, 0.65]), {"beta": 0.1, "label_smoothing": 0.1},
        variants=DPO_VARIANTS, catches=["tinker-cookbook#188", "DeepSpeedExamples#501"])
    logp_a, logp_b = [-3.5, -40.25, -0.125, -11.0], [-9.0, -2.5, -17.75, -11.0]
    add("dpo-policy-equals-reference", "dpo",
        "Before the first step the policy is the reference: h = 0, the loss is log 2 under any labels, every pair "
        "ties (accuracy 0, margin 0). A loss that stays here means the reference moves with the policy.",
        pairs(logp_a, logp_b, logp_a, logp_b, [1.0, 0.0, 0.7, 0.5]), {"beta": 0.5, "label_smoothing": 0.25},
        variants=DPO_VARIANTS, catches=["POVID#11", "ETO#14"])
    seq_logits = [[[((b * 37 + t * 11 + v * 5) % 17 - 8) / 2.0 for v in range(8)] for t in range(6)]
                  for b in range(4)]
    seq_logits[3][2][0] = -INF  # a masked slot: its log-prob is -inf, which a mask that multiplies turns into nan
    add("dpo-sequence-logprobs", "dpo_sequence_logprobs",
        "log pi(y|x) = sum over the response tokens of log p(token | before it): logits at t predict ids[t + 1]; "
        "prompt and padding tokens do not count (row 3: one response token, -inf at a padded slot).",
        {"logits": seq_logits, "ids": [[1, 4, 6, 2, 3, 0], [1, 5, 3, 7, 2, 0], [1, 4, 6, 6, 5, 2], [1, 2, 0, 0, 0, 0]],
         "response_mask": [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]},
        variants=["any"], catches=["llm_related#33", "InternVL#1053"])
    return c


def build() -> list[dict]:
    """Every case with its expected outputs filled in."""
    cases = _cases()
    for case in cases:
        case["expected"] = {v: run(case["function"], v, case["inputs"], case["params"]) for v in case["variants"]}
        del case["variants"]
    return cases


def generate(out_dir: str | Path) -> list[Path]:
    """Write one <id>.json per case into out_dir (atomically); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in build():
        path = out / f"{case['id']}.json"
        atomic_write_text(path, dumps(case))
        paths.append(path)
    return paths


def cases(function: str | None = None, variant: str | None = None):
    """Golden cases for another framework's unit tests, built in memory (no files needed):
    yields (id, inputs, params, expected outputs, tolerance) for each case of `function` with an entry for
    `variant` (a profile, mode or estimator name), tensors as float64 (ids and masks as given). For example,
        for id_, x, p, want, tol in cases("advantages", "verl"):
            adv, ret = my_gae(x["rewards"], x["values"], x["mask"], p["gamma"], p["lam"])"""
    for case in build():
        if function is not None and case["function"] != function:
            continue
        for v, want in case["expected"].items():
            if variant is None or v == variant:
                inputs = {k: tensor(val, torch.long if k in ("ids", "tokens", "truncated") else D)
                          for k, val in case["inputs"].items()}
                expected = {k: val if k == "error" else tensor(encode(val)) for k, val in want.items()}
                yield case["id"], inputs, case["params"], expected, case["tolerance"]


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())

