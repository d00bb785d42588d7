"""The dump format, and a checker that recomputes a framework's PPO tensors stage by stage under a convention.

A dump is two files side by side:
  NAME.safetensors  response-aligned tensors: [B, T] with position t = response token t (prompt and left padding
                    removed), plus [B] per-row tensors and 0-dim scalars. Only `response_mask` is required:
      response_mask          1 on the response tokens the policy loss counts (the framework's own mask)
      response_ids           sampled tokens                          logits       [B, T, V] raw logits predicting them
      old_logprobs           rollout-time log-probs of the policy    ref_logprobs reference log-probs
      new_logprobs           log-probs in the training forward       values / new_values   V before / in the update
      scores [B]             the reward model's score (before any missing-EOS penalty)
      truncated [B]          1 where the response has no EOS         kl           per-token KL estimate
      token_rewards          -beta * kl plus the score at its slot   advantages_raw / advantages  GAE / whitened
      returns                value targets                           pg_loss_tokens, pg_loss, vf_loss, clipfrac
      entropy_tokens         per-token entropy                       group_index [B]  GRPO group of each row
  NAME.json         the sidecar: framework, version, convention (a profile name), dtype (float64 | float32 |
                    bfloat16: what the framework computed in), temperature, kl_coef, kl_estimator, gamma, lam,
                    clip_low, clip_high, value_clip, loss_agg_mode, missing_eos_penalty, whiten_advantages,
                    first_minibatch (true when new_logprobs come from the first minibatch before any update),
                    group_estimator (GRPO family: a reference.GROUP_ESTIMATORS name; then `advantages` are checked
                    as each row's group advantage on its valid tokens).

Each stage is recomputed from the dump's own upstream tensors (teacher forcing), so the first stage that disagrees
is where the bug is, not smeared over everything after it. A stage that disagrees under the convention being checked
but agrees under another profile is EXPLAINED (shown, with the axes that differ); one that no profile reproduces is
a MISMATCH.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from minicai import MinicaiError
from minicai.data import atomic_write, atomic_write_text
from minicai.oracle import reference as R
from minicai.oracle.conventions import PROFILES, Convention, diff

D = torch.float64

# (atol, rtol) per quantity group; "bf16" compares the median |diff| only (elementwise checks are not meaningful).
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "exact": {"logprobs": (1e-12, 1e-12), "kl": (1e-12, 1e-12), "rewards": (1e-12, 1e-12),
              "whitened": (1e-11, 1e-11), "loss": (1e-12, 1e-12), "entropy": (1e-12, 1e-12)},
    "fp32": {"logprobs": (1e-5, 0.0), "kl": (2e-5, 0.0), "rewards": (1e-5, 1e-5), "whitened": (1e-4, 0.0),
             "loss": (1e-6, 1e-5), "entropy": (1e-4, 0.0)},
    "bf16": {"logprobs": (5e-3, 0.0), "kl": (5e-3, 0.0), "rewards": (2e-2, 0.0), "whitened": (5e-2, 0.0),
             "loss": (2e-2, 0.0), "entropy": (5e-2, 0.0)},
}

STAGE_AXES = {
    "old_logprobs": ("logprob_temperature",),
    "kl": ("kl_names", "kl_log_ratio_clamp", "kl_log_ratio_clamp_kinds", "kl_result_clamp", "kl_clamp_kinds"),
    "token_rewards": ("score_position", "empty_row", "missing_eos", "after_eos", "score_clip"),
    "advantages_raw": ("gae_hole", "value_extra", "value_mask"),
    "returns": ("gae_hole", "value_extra", "value_mask"),
    "advantages": ("whiten_var", "whiten_eps", "whiten_eps_mode", "masked_mean_eps", "advantages_outside"),
    "pg_loss_tokens": ("log_ratio_clamp", "log_ratio_masked", "dual_clip"),
    "pg_loss": ("pg_agg", "log_ratio_clamp", "log_ratio_masked", "dual_clip"),
    "vf_loss": ("value_mask", "value_clip", "pg_agg"),
    "entropy_tokens": ("entropy_logits", "logprob_temperature"),
    "group_advantages": (),  # GRPO family: named by reference.GROUP_ESTIMATORS, not by a profile axis
}
STAGE_GROUP = {"old_logprobs": "logprobs", "kl": "kl", "token_rewards": "rewards", "advantages_raw": "rewards",
               "returns": "rewards", "advantages": "whitened", "pg_loss_tokens": "loss", "pg_loss": "loss",
               "vf_loss": "loss", "entropy_tokens": "entropy", "group_advantages": "whitened"}


def write_dump(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write NAME.safetensors and NAME.json, each atomically (data.atomic_write)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a dump is NAME.safetensors, got {path}")
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_dump(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors.torch import load_file

    path = Path(path)
    side = path.with_suffix(".json")
    for p in (path, side):
        if not p.is_file():
            raise MinicaiError(f"{p}: no such file; a dump is NAME.safetensors plus its sidecar NAME.json")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise MinicaiError(f"{path}: not a safetensors file ({err}); write it with minicai.oracle.check.write_dump")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise MinicaiError(f"{side}:{err.lineno}: invalid JSON ({err.msg}); fix the sidecar") from None
    if "response_mask" not in tensors:
        raise MinicaiError(f"{path}: no 'response_mask' tensor; every dump needs the [B, T] mask of response tokens")
    return tensors, meta


# ---------------------------------------------------------------------------------------------------------------------
# Stages: each returns (want, compare mask) recomputed under `conv` from the dump's upstream tensors, or None


def _f(x: Tensor) -> Tensor:
    return x.to(D)


def _stage(name: str, conv: Convention, t: dict[str, Tensor], meta: dict) -> tuple[Tensor, Tensor] | None:
    m = _f(t["response_mask"])
    has = lambda *keys: all(k in t for k in keys)  # noqa: E731
    T = meta.get("temperature", 1.0)
    if name == "old_logprobs" and has("logits", "response_ids", "old_logprobs"):
        return R.logprobs(conv, t["logits"], t["response_ids"], T), m
    if name == "kl" and has("old_logprobs", "ref_logprobs", "kl"):
        return R.kl(conv, t["old_logprobs"], t["ref_logprobs"], meta.get("kl_estimator", "k1")) * m, m
    if name == "token_rewards" and has("scores", "kl", "token_rewards"):
        pen = meta.get("missing_eos_penalty") or 0.0
        pen = abs(pen) if conv.missing_eos == "subtract" else -abs(pen)
        beta = meta.get("kl_coef", 0.0)
        want = R.token_rewards(conv, t["scores"], t["kl"], m, beta, t.get("truncated"), pen)
        # Every slot counts (a score in the wrong place is a difference), except slots outside the convention's GAE
        # region that hold only their own KL penalty: frameworks that mask later may leave -beta * KL there.
        got = _f(t["token_rewards"])
        kl_only = (got - (-beta * _f(t["kl"]))).abs() <= 1e-6 * (1 + got.abs())
        return want, 1.0 - ((R.gae_mask(conv, m) == 0) & kl_only).to(D)
    if name in ("advantages_raw", "returns") and has("token_rewards", "values", name):
        adv, ret = R.advantages(conv, t["token_rewards"], t["values"], m, meta.get("gamma", 1.0),
                                meta.get("lam", 0.95))
        return (adv if name == "advantages_raw" else ret), R.gae_mask(conv, m)
    if name == "group_advantages" and has("group_index", "scores", "advantages") and meta.get("group_estimator"):
        return _group_advantages(t, meta["group_estimator"]) * m, m
    if name == "advantages" and has("advantages_raw", "advantages") and meta.get("whiten_advantages", True) \
            and not meta.get("group_estimator"):
        return R.whiten(conv, t["advantages_raw"], m), m
    if name in ("pg_loss_tokens", "pg_loss") and has("new_logprobs", "old_logprobs", "advantages", name):
        per_tok, _ = R.policy_loss_tokens(conv, t["new_logprobs"], t["old_logprobs"], t["advantages"], m,
                                          meta.get("clip_low", 0.2), meta.get("clip_high"))
        if name == "pg_loss_tokens":
            return per_tok * m, m
        return R.aggregate(conv, per_tok, m, meta.get("loss_agg_mode")), torch.ones(())
    if name == "vf_loss" and has("new_values", "values", "returns", "vf_loss"):
        return R.value_loss(conv, t["new_values"], t["values"], t["returns"], m, meta.get("value_clip")), torch.ones(())
    if name == "entropy_tokens" and has("logits", "entropy_tokens") and conv.entropy_logits != "none":
        return R.entropy_tokens(conv, t["logits"], T), m
    return None


def _group_advantages(t: dict[str, Tensor], estimator: str) -> Tensor:
    """Each row's sequence-level advantage under a GRPO-family estimator, from `scores` [B] and `group_index` [B]
    (rows with one index are the samples of one prompt; every group must have the same size): [B, 1]."""
    idx = t["group_index"].long()
    groups = idx.unique()  # sorted
    rows = [(idx == g).nonzero().flatten() for g in groups]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"groups of different sizes {sorted({len(r) for r in rows})}; every prompt needs G samples")
    order = torch.stack(rows)  # [P, G] row numbers
    adv = R.group_advantages(_f(t["scores"])[order], estimator)  # [P, G]
    out = torch.zeros(idx.shape[0], dtype=D)
    out[order.flatten()] = adv.flatten()
    return out.unsqueeze(1)


STAGES = tuple(STAGE_AXES)


@dataclass
class Row:
    quantity: str
    max_diff: float
    median_diff: float
    tol: str
    verdict: str  # ok | EXPLAINED | MISMATCH
    note: str = ""
    where: tuple = ()


@dataclass
class Report:
    path: str
    convention: str
    declared: str
    tolerance: str
    rows: list[Row] = field(default_factory=list)
    invariants: list[tuple[str, bool, str]] = field(default_factory=list)
    first: Row | None = None
    cause: str = ""

    @property
    def ok(self) -> bool:
        return self.first is None and all(ok for _, ok, _ in self.invariants)  # "EXPLAINED" is truthy

    @property
    def clean(self) -> bool:
        """ok with nothing explained: every stage and invariant agrees with the convention checked."""
        return self.ok and not self.explained() and all(ok != "EXPLAINED" for _, ok, _ in self.invariants)

    def explained(self) -> dict[str, str]:
        """{quantity: "by PROFILE (axis: ours -> theirs)"} for each stage another profile explains."""
        return {r.quantity: r.note for r in self.rows if r.verdict == "EXPLAINED"}

    def text(self) -> str:
        out = [f"dump {self.path}: declared {self.declared}, checked as {self.convention}, tolerance {self.tolerance}",
               f"{'quantity':<16} {'max|diff|':>10} {'median|diff|':>13} {'tolerance':>16}  verdict"]
        for r in self.rows:
            out.append(f"{r.quantity:<16} {r.max_diff:>10.3g} {r.median_diff:>13.3g} {r.tol:>16}  {r.verdict}"
                       + (f"  {r.note}" if r.note else ""))
        out.append("invariants:")
        out += [f"  {ok if isinstance(ok, str) else 'ok' if ok else 'FAIL':<9} {name}{': ' + note if note else ''}"
                for name, ok, note in self.invariants]
        if self.first is not None:
            out.append(f"FIRST DIVERGENCE: {self.first.quantity} at {self.first.where}; likely cause: {self.cause}")
        else:
            explained = [r.quantity for r in self.rows if r.verdict == "EXPLAINED"]
            explained += [f"invariant '{name}'" for name, ok, _ in self.invariants if ok == "EXPLAINED"]
            out.append("RESULT: " + ("pass" if self.ok else "invariant failures") +
                       (f" (explained differences: {', '.join(explained)})" if explained else ""))
        return "\n".join(out)


def _compare(got: Tensor, want: Tensor, mask: Tensor, atol: float, rtol: float, bf16: bool):
    """(max |diff|, median |diff|, passes, (b, t) of the worst element) over mask."""
    g, w = _f(got), _f(want)
    sel = mask.expand_as(w).bool() if mask.dim() else torch.ones_like(w, dtype=torch.bool)
    both_nan = torch.isnan(g) & torch.isnan(w)
    d = torch.where(both_nan, torch.zeros_like(g), (g - w).abs())
    d = torch.where(sel, d, torch.zeros_like(d)).nan_to_num(nan=math.inf)
    vals = d[sel]
    if vals.numel() == 0:
        return 0.0, 0.0, True, ()
    mx, med = float(vals.max()), float(vals.median())
    bound = atol + rtol * w.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    passes = med <= atol if bf16 else bool(((d <= bound) | ~sel).all())
    where = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape)) if d.dim() else ()
    return mx, med, passes, where


def _cause(stage: str, got: Tensor, want: Tensor, mask: Tensor, where: tuple) -> str:
    """A likely cause from the pattern of the difference (research notes sec. 3.3)."""
    if stage == "token_rewards" and got.dim() == 2:
        b = where[0] if where else 0
        slots = ((got[b] - want[b]).abs() > 1e-6).nonzero().flatten().tolist()
        if len(slots) <= 2:
            return (f"row {b} differs only at t={slots} (its last valid token is t={int(R.last_valid(mask)[b])}): the "
                    "score sits in another slot; score placement / off-by-one (trl#3750, DeepSpeedExamples#672)")
        return "KL coefficient or KL sign differs (reward = score - beta * KL)"
    if stage == "old_logprobs":
        return "temperature missing on one side, or logits shifted by one (OpenRLHF#853, trl#4159, maxtext#2103)"
    if stage == "kl":
        return "KL estimator, argument order or clamp (verl#6058, OpenRLHF d90b3d1f)"
    if stage in ("advantages_raw", "returns"):
        return "GAE masking: values after EOS bootstrapping, or a different hole rule (verl#50, ROLL#447, verl#2337)"
    if stage == "advantages":
        return "whitening: biased vs unbiased variance, statistics over padding or another scope (trl#153)"
    if stage in ("pg_loss", "pg_loss_tokens"):
        return "loss aggregation / normaliser, dual-clip or log-ratio clamp (verl#3741, verl#5625)"
    if stage == "group_advantages":
        return "group baseline or scale: std over the wrong set (batch vs group), Bessel, or the eps on the std"
    if stage == "vf_loss":
        return "value mask or value clip range"
    return "temperature of the entropy (OpenRLHF#1319)"


def check(tensors: dict[str, Tensor], meta: dict, convention: str | None = None, tolerance: str | None = None,
          path: str = "<dump>") -> Report:
    declared = meta.get("convention", "minicai")
    name = convention or declared
    if name not in PROFILES:
        raise MinicaiError(f"{path}: unknown convention {name!r}; use one of {', '.join(PROFILES)}")
    conv = PROFILES[name]
    dtype = meta.get("dtype") or ("bfloat16" if any(v.dtype == torch.bfloat16 for v in tensors.values())
                                  else "float32" if any(v.dtype == torch.float32 for v in tensors.values())
                                  else "float64")
    tol = tolerance or {"float64": "exact", "float32": "fp32", "bfloat16": "bf16"}.get(dtype, "fp32")
    if tol == "exact" and dtype != "float64":
        raise MinicaiError(f"{path}: an exact check needs a float64 dump, this one is {dtype}; use --tolerance "
                           f"{'bf16' if dtype == 'bfloat16' else 'fp32'}")
    rep = Report(path, name, declared, tol)
    m = _f(tensors["response_mask"])
    for stage in STAGES:
        atol, rtol = TOLERANCES[tol][STAGE_GROUP[stage]]
        refusal = ""
        try:
            res = _stage(stage, conv, tensors, meta)
        except ValueError as err:  # the convention cannot compute this stage on these inputs
            res, refusal = None, str(err)
        if res is None and not refusal:
            continue  # the dump lacks this stage's inputs
        got = _f(tensors["advantages" if stage == "group_advantages" else stage])
        if refusal:
            row = Row(stage, math.nan, math.nan, f"{tol}:{atol:g}", "MISMATCH", note=f"{name} refuses: {refusal}")
        else:
            want, mask = res
            mx, med, passes, where = _compare(got, want, mask, atol, rtol, tol == "bf16")
            row = Row(stage, mx, med, f"{tol}:{atol:g}", "ok" if passes else "MISMATCH", where=where)
        if row.verdict == "MISMATCH":
            explain = _explain_group if stage == "group_advantages" else _explain
            note = explain(stage, conv, declared, tensors, meta, got, atol, rtol, tol == "bf16")
            if note:
                row.verdict, row.note = "EXPLAINED", note
        if row.verdict == "MISMATCH" and rep.first is None:
            rep.first = row
            rep.cause = row.note or _cause(stage, got, want, m, row.where)
        rep.rows.append(row)
    _invariants(rep, conv, tensors, meta, m, tol)
    return rep


def _reproduces(stage, conv, tensors, meta, got, atol, rtol, bf16) -> bool:
    try:
        alt = _stage(stage, conv, tensors, meta)
    except ValueError:
        return False
    return alt is not None and _compare(got, alt[0], alt[1], atol, rtol, bf16)[2]


def _explain(stage, conv, declared, tensors, meta, got, atol, rtol, bf16) -> str:
    """'by PROFILE (axis: ours -> theirs; ...)' when another profile reproduces the dump's values for this stage,
    naming the single axes that explain it on their own when there are such; '' when no profile does."""
    for other in [declared] + [p for p in PROFILES if p != declared]:
        if other == conv.name or other not in PROFILES:
            continue
        theirs = PROFILES[other]
        if not _reproduces(stage, theirs, tensors, meta, got, atol, rtol, bf16):
            continue
        axes = [(a, va, vb) for a, va, vb in diff(conv, theirs) if a in STAGE_AXES[stage]]
        alone = [(a, va, vb) for a, va, vb in axes
                 if _reproduces(stage, dataclasses.replace(conv, **{a: vb}), tensors, meta, got, atol, rtol, bf16)]
        shown = alone or axes
        if stage == "kl":  # the whole name table is long: show only the name the dump used
            name = meta.get("kl_estimator", "k1")
            shown = [(a, (f"no {name!r}" if name not in dict(va) else f"{name!r} = {dict(va)[name]}"),
                      f"{name!r} = {dict(vb).get(name)}") if a == "kl_names" else (a, va, vb) for a, va, vb in shown]
        return f"by {other} ({'; '.join(f'{a}: {_show(va)} -> {_show(vb)}' for a, va, vb in shown) or 'same axes'})"
    return ""


def _show(v) -> str:
    return v if isinstance(v, str) and ("=" in v or v.startswith("no ")) else repr(v)


def _explain_group(stage, conv, declared, tensors, meta, got, atol, rtol, bf16) -> str:
    """'by the NAME estimator (...)' when another GRPO-family estimator reproduces the dump's advantages."""
    for est, spec in R.GROUP_ESTIMATORS.items():
        if est != meta["group_estimator"] and _reproduces(stage, conv, tensors, {**meta, "group_estimator": est},
                                                          got, atol, rtol, bf16):
            return f"by the {est} estimator ({spec})"
    return ""


def _invariants(rep: Report, conv: Convention, t: dict[str, Tensor], meta: dict, m: Tensor, tol: str) -> None:
    sel = m.bool()
    if "new_logprobs" in t and "old_logprobs" in t and meta.get("first_minibatch", False):
        dev = float((torch.exp(_f(t["new_logprobs"]) - _f(t["old_logprobs"])) - 1).abs()[sel].max())
        bound = {"exact": 1e-12, "fp32": 1e-4, "bf16": 1e-2}[tol]
        rep.invariants.append(("ratio == 1 before the first update", dev <= bound, f"max |ratio - 1| = {dev:.3g}"))
    if "entropy_tokens" in t:
        lo = float(_f(t["entropy_tokens"])[sel].min())
        rep.invariants.append(("entropy >= 0", lo >= -1e-6, f"min {lo:.3g}"))
    for k in ("old_logprobs", "new_logprobs", "ref_logprobs"):
        if k in t:
            hi = float(_f(t[k])[sel].max())
            rep.invariants.append((f"{k} <= 0 on valid tokens", hi <= 1e-6, f"max {hi:.3g}"))
    bad = [k for k, v in t.items() if v.dim() == 2 and v.shape == m.shape and v.is_floating_point()
           and not bool(torch.isfinite(v[sel]).all())]
    rep.invariants.append(("finite on valid tokens", not bad, ", ".join(bad)))
    if "advantages" in t and meta.get("whiten_advantages", True):
        nz = _f(t["advantages"]) != 0
        n_nz, n_valid = int(nz.sum()), int(sel.sum())
        if conv.advantages_outside == "zero":
            exact = bool((nz == sel).all())
            declared = PROFILES.get(rep.declared)
            if not exact and declared is not None and declared.advantages_outside == "left" and bool(nz[sel].all()):
                rep.invariants.append(("advantages non-zero on exactly the valid tokens", "EXPLAINED",
                                       f"{n_nz} non-zero, {n_valid} valid; by {declared.name} (advantages_outside: "
                                       f"'zero' -> 'left')"))
            else:
                rep.invariants.append(("advantages non-zero on exactly the valid tokens", exact,
                                       f"{n_nz} non-zero, {n_valid} valid"))
        else:  # the convention leaves whatever whitening gives outside the mask (the loss masks it)
            rep.invariants.append(("advantages non-zero on every valid token", bool(nz[sel].all()),
                                   f"{int(nz[sel].sum())} of {n_valid}; {n_nz - int(nz[sel].sum())} non-zero outside "
                                   f"the mask, which {conv.name} leaves ({conv.sources['advantages_outside']})"))


def check_file(path: str | Path, convention: str | None = None, tolerance: str | None = None) -> Report:
    tensors, meta = load_dump(path)
    return check(tensors, meta, convention, tolerance, str(path))
