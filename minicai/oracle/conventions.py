"""Named RLHF/PPO conventions: one frozen `Convention` per framework, one field per axis on which public
implementations disagree, each field with the source line it was read from.

The axes and facts come from reading each framework at the commit named in its sources (`repo@commit:path:line`);
the versions a profile holds for are in `versions`, and a field that changed between versions says so in its source.
`minicai` is the canonical profile: what minicai/losses.py computes.
"""

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping

# The values each axis can take (the reference functions in reference.py implement every one of them).
AXES: dict[str, tuple] = {
    "logprob_temperature": ("divide", "divide_eps", "none"),  # logits / T, logits / (T + 1e-7), raw logits
    "score_position": ("last_valid", "after_last_valid", "last_column"),
    "empty_row": ("error", "wraps_to_last", "slot_0"),  # where the score of a zero-length response goes
    "missing_eos": ("add", "subtract", "replace", "none"),  # what a truncation penalty does to the score
    "mask_rule": ("through_eos", "non_pad", "all"),  # which response tokens are valid (pad == eos differs)
    "after_eos": ("masked", "sentinel", "trained"),  # log-probs after the last valid token
    "value_extra": (0, 1),  # values kept this many slots past the last valid token
    "gae_hole": ("end", "zero", "skip", "none"),  # "none": no mask at all (fixed-length responses)
    "whiten_var": ("unbiased", "biased", "none"),  # "none": advantages are not whitened
    "whiten_eps_mode": ("add", "clamp"),  # rsqrt(var + eps) or rsqrt(max(var, eps))
    "reward_whitening": ("off", "optional", "on"),
    "advantages_outside": ("zero", "left"),  # advantages outside the mask after whitening: set to 0, or left as is
    "pg_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "value_mask": ("valid", "valid_p1", "all"),
    "entropy_logits": ("tempered", "raw", "none"),
    "adaptive_kl_input": ("seq_sum", "seq_token_mean", "fixed", "caller"),
}


@dataclass(frozen=True, eq=False)
class Convention:
    """One framework's choices on every axis of the convention matrix (research notes, sec. 1.9)."""

    name: str
    framework: str
    versions: str  # the releases this profile describes
    logprob_temperature: str
    kl_names: tuple[tuple[str, str], ...]  # advertised estimator name -> minicai kind (k1, abs, k2, k3, full)
    kl_log_ratio_clamp: tuple[float | None, float | None] | None  # (min, max) of d before the estimator
    kl_log_ratio_clamp_kinds: tuple[str, ...]  # the minicai kinds that clamp applies to
    kl_result_clamp: float | None  # the estimate clamped to [-c, c]
    kl_clamp_kinds: tuple[str, ...]  # the minicai kinds the result clamp applies to
    score_clip: float | None  # the score clamped to [-c, c] before it enters the reward
    mask_rule: str
    score_position: str
    empty_row: str
    missing_eos: str
    after_eos: str
    value_extra: int
    gae_hole: str
    whiten_var: str
    whiten_eps: float
    whiten_eps_mode: str
    masked_mean_eps: float  # added to the token count of every masked mean (verl)
    whiten_scope: str  # which tokens the statistics cover (words; the dump checker uses the mask it is given)
    reward_whitening: str
    advantages_outside: str
    pg_agg: str
    log_ratio_clamp: float | None  # PPO log-ratio clamped before exp
    log_ratio_masked: bool  # log-ratio multiplied by the mask before exp (DeepSpeed-Chat)
    dual_clip: float | None  # c of dual-clip PPO for A < 0
    value_clip: float
    value_mask: str
    entropy_logits: str
    adaptive_kl_input: str
    sources: Mapping[str, str] = field(default_factory=dict)  # axis -> "repo@commit:path:line (versions)"

    def __post_init__(self) -> None:
        for axis, allowed in AXES.items():
            if getattr(self, axis) not in allowed:
                raise ValueError(f"{self.name}: {axis}={getattr(self, axis)!r} is not one of {allowed}")
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    def kl_kind(self, name: str) -> str:
        """The minicai estimator behind an advertised name; verl's "+" suffix (straight-through gradient) has the
        forward value of the name without it."""
        names = dict(self.kl_names)
        if name not in names:
            raise ValueError(f"{self.name} has no KL estimator {name!r}; it advertises {', '.join(names)}")
        return names[name]


AXIS_FIELDS = tuple(f.name for f in fields(Convention) if f.name not in ("name", "framework", "versions", "sources"))

LMHP = "openai/lm-human-preferences@cbfd210:lm_human_preferences"
TRL1 = "huggingface/trl@v1.12.0:trl/experimental/ppo/ppo_trainer.py"
TRL011 = "huggingface/trl@v0.11.0:trl"
ORLHF = "OpenRLHF/OpenRLHF@v0.11.2:openrlhf"
VERL = "volcengine/verl@b178a3c:verl"
VERL9 = "volcengine/verl@v0.9.1:verl"
DSC = "deepspeedai/DeepSpeedExamples@45b4b71:applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py"
MINI = "minicai/losses.py"


def _profile(name: str, framework: str, versions: str, **axes: tuple) -> Convention:
    """A Convention from axis=(value, source) pairs: every value is written next to the line it was read from."""
    missing = [a for a in AXIS_FIELDS if a not in axes]
    if missing:
        raise ValueError(f"{name}: no value for {missing}")
    return Convention(name=name, framework=framework, versions=versions,
                      **{a: v for a, (v, _) in axes.items()}, sources={a: s for a, (_, s) in axes.items()})


MINICAI = _profile(
    "minicai", "minicai",
    "this repository",
    logprob_temperature=("divide", f"{MINI}:token_logprobs"),
    kl_names=((("k1", "k1"), ("abs", "abs"), ("k2", "k2"), ("k3", "k3")), f"{MINI}:kl_penalty"),
    kl_log_ratio_clamp=(None, f"{MINI}:kl_penalty"),
    kl_log_ratio_clamp_kinds=((), f"{MINI}:kl_penalty"),
    kl_result_clamp=(None, f"{MINI}:kl_penalty"),
    kl_clamp_kinds=((), f"{MINI}:kl_penalty"),
    score_clip=(None, f"{MINI}:per_token_rewards (no clip)"),
    mask_rule=("through_eos", "minicai/ppo.py:rollout (stop token kept)"),
    score_position=("last_valid", f"{MINI}:per_token_rewards"),
    empty_row=("error", f"{MINI}:last_token_index (raises on an empty row)"),
    missing_eos=("add", f"{MINI}:per_token_rewards"),
    after_eos=("masked", "minicai/ppo.py:rollout (response mask)"),
    value_extra=(0, f"{MINI}:gae"),
    gae_hole=("end", f"{MINI}:gae (hole='end')"),
    whiten_var=("unbiased", f"{MINI}:whiten"),
    whiten_eps=(1e-08, f"{MINI}:whiten"),
    whiten_eps_mode=("add", f"{MINI}:whiten"),
    masked_mean_eps=(0.0, f"{MINI}:masked_mean"),
    whiten_scope=("the tensor the caller passes", "minicai/ppo.py:rollout"),
    reward_whitening=("off", "minicai/ppo.py (none)"),
    advantages_outside=("zero", f"{MINI}:whiten (0 outside the mask)"),
    pg_agg=("token-mean", f"{MINI}:ppo_policy_loss"),
    log_ratio_clamp=(None, f"{MINI}:ppo_policy_loss"),
    log_ratio_masked=(False, f"{MINI}:ppo_policy_loss"),
    dual_clip=(None, f"{MINI}:ppo_policy_loss"),
    value_clip=(0.2, "minicai/ppo.py:PPOConfig"),
    value_mask=("valid", f"{MINI}:ppo_value_loss"),
    entropy_logits=("tempered", f"{MINI}:entropy_from_logits (temperature)"),
    adaptive_kl_input=("caller", f"{MINI}:AdaptiveKLController"),
)

LM_HUMAN_PREFERENCES = _profile(
    "lm-human-preferences", "openai/lm-human-preferences",
    "master (2019-2023)",
    logprob_temperature=("divide", f"{LMHP}/policy.py:119-124"),
    kl_names=((("kl", "k1"),), f"{LMHP}/train_policy.py:150"),
    kl_log_ratio_clamp=(None, f"{LMHP}/train_policy.py:150"),
    kl_log_ratio_clamp_kinds=((), f"{LMHP}/train_policy.py:150"),
    kl_result_clamp=(None, f"{LMHP}/train_policy.py:150"),
    kl_clamp_kinds=((), f"{LMHP}/train_policy.py:150"),
    score_clip=(None, f"{LMHP}/train_policy.py:153 (no clip)"),
    mask_rule=("all", f"{LMHP}/train_policy.py:153 (fixed length)"),
    score_position=("last_column", f"{LMHP}/train_policy.py:153"),
    empty_row=("wraps_to_last", f"{LMHP}/train_policy.py:153 (fixed length: always the last column)"),
    missing_eos=("replace", f"{LMHP}/train_policy.py:388-390"),
    after_eos=("trained", f"{LMHP}/lm_tasks.py:38-44"),
    value_extra=(0, f"{LMHP}/train_policy.py:327-336"),
    gae_hole=("none", f"{LMHP}/train_policy.py:327-336"),
    whiten_var=("biased", f"{LMHP}/utils/core.py:336-341 (tf.nn.moments)"),
    whiten_eps=(1e-08, f"{LMHP}/utils/core.py:336-341"),
    whiten_eps_mode=("add", f"{LMHP}/utils/core.py:336-341"),
    masked_mean_eps=(0.0, f"{LMHP}/utils/core.py:336-341"),
    whiten_scope=("each minibatch, unmasked (fixed length)", f"{LMHP}/train_policy.py:325-338"),
    reward_whitening=("on", f"{LMHP}/train_policy.py:58, 325"),
    advantages_outside=("left", f"{LMHP}/utils/core.py:336-341 (no mask)"),
    pg_agg=("token-mean", f"{LMHP}/train_policy.py:354"),
    log_ratio_clamp=(None, f"{LMHP}/train_policy.py:350-354"),
    log_ratio_masked=(False, f"{LMHP}/train_policy.py:350-354"),
    dual_clip=(None, f"{LMHP}/train_policy.py:354"),
    value_clip=(0.2, f"{LMHP}/train_policy.py:344-348"),
    value_mask=("all", f"{LMHP}/train_policy.py:344-348"),
    entropy_logits=("tempered", f"{LMHP}/policy.py:124"),
    adaptive_kl_input=("seq_sum", f"{LMHP}/train_policy.py:120-124, 221"),
)

TRL_PPO = _profile(
    "trl-ppo", "huggingface/trl (trl.experimental.ppo)",
    ">=1.0,<=1.12 (read at 1.12.0)",
    logprob_temperature=("divide_eps", f"{TRL1}:622, 713, 822"),
    kl_names=((("k1", "k1"), ("k3", "k3")), f"{TRL1}:404, 773-774"),
    kl_log_ratio_clamp=(None, f"{TRL1}:773-774"),
    kl_log_ratio_clamp_kinds=((), f"{TRL1}:773-774"),
    kl_result_clamp=(None, f"{TRL1}:773-774"),
    kl_clamp_kinds=((), f"{TRL1}:773-774"),
    score_clip=(None, f"{TRL1}:779 (no clip)"),
    mask_rule=("non_pad", f"{TRL1}:727, 764 (pad == eos drops the EOS, trl#5303 review)"),
    score_position=("after_last_valid", f"{TRL1}:778-779 (issues trl#1893, trl#3750)"),
    empty_row=("slot_0", f"{TRL1}:727, 778 (sequence_length -1: the score lands on slot 0)"),
    missing_eos=("subtract", f"{TRL1}:758-759"),
    after_eos=("sentinel", f"{TRL1}:69, 764-766 (INVALID_LOGPROB = 1.0)"),
    value_extra=(1, f"{TRL1}:767-769"),
    gae_hole=("none", f"{TRL1}:786-796"),
    whiten_var=("unbiased", f"{TRL1}:264 (masked_whiten)"),
    whiten_eps=(1e-08, f"{TRL1}:264"),
    whiten_eps_mode=("add", f"{TRL1}:264"),
    masked_mean_eps=(0.0, f"{TRL1}:masked_mean"),
    whiten_scope=("local batch per process, valid tokens", f"{TRL1}:797-798"),
    reward_whitening=("optional", f"{TRL1}:782-784"),
    advantages_outside=("zero", f"{TRL1}:798 (masked_fill(advantages, padding_mask, 0))"),
    pg_agg=("token-mean", f"{TRL1}:846"),
    log_ratio_clamp=(None, f"{TRL1}:841-846"),
    log_ratio_masked=(False, f"{TRL1}:841-846"),
    dual_clip=(None, f"{TRL1}:841-846"),
    value_clip=(0.2, "huggingface/trl@v1.12.0:trl/experimental/ppo/ppo_config.py (cliprange_value)"),
    value_mask=("valid_p1", f"{TRL1}:837"),
    entropy_logits=("tempered", f"{TRL1}:856"),
    adaptive_kl_input=("fixed", f"{TRL1} (fixed kl_coef)"),
)

TRL_PPO_011 = _profile(
    "trl-ppo-0.11", "huggingface/trl (legacy PPOTrainer)",
    ">=0.4 (trl#153),<=0.11",
    logprob_temperature=("none", f"{TRL011}/core.py:115-124; huggingface/trl@v0.11.0:trl/trainer/ppo_trainer.py:1031"),
    kl_names=(
        (("kl", "k1"), ("abs", "abs"), ("mse", "k2"), ("full", "full")),
        f"{TRL011}/trainer/ppo_trainer.py:1150-1164",
    ),
    kl_log_ratio_clamp=(None, f"{TRL011}/trainer/ppo_trainer.py:1150-1164"),
    kl_log_ratio_clamp_kinds=((), f"{TRL011}/trainer/ppo_trainer.py:1150-1164"),
    kl_result_clamp=(None, f"{TRL011}/trainer/ppo_trainer.py:1150-1164"),
    kl_clamp_kinds=((), f"{TRL011}/trainer/ppo_trainer.py:1150-1164"),
    score_clip=(None, f"{TRL011}/trainer/ppo_trainer.py:1112-1148 (no clip)"),
    mask_rule=("through_eos", f"{TRL011}/trainer/ppo_trainer.py:1031-1052 (attention mask)"),
    score_position=("last_valid", f"{TRL011}/trainer/ppo_trainer.py:1112-1148"),
    empty_row=("error", f"{TRL011}/trainer/ppo_trainer.py:1112-1148 (mask.nonzero()[-1] fails on an empty row)"),
    missing_eos=("none", f"{TRL011}/trainer/ppo_trainer.py (left to the user)"),
    after_eos=("masked", f"{TRL011}/trainer/ppo_trainer.py:1031-1052"),
    value_extra=(0, f"{TRL011}/trainer/ppo_trainer.py:1166-1192"),
    gae_hole=("zero", f"{TRL011}/trainer/ppo_trainer.py:1166-1192"),
    whiten_var=("unbiased", f"{TRL011}/core.py:144-169 (since trl#153)"),
    whiten_eps=(1e-08, f"{TRL011}/core.py:144-169"),
    whiten_eps_mode=("add", f"{TRL011}/core.py:144-169"),
    masked_mean_eps=(0.0, f"{TRL011}/core.py:144-169"),
    whiten_scope=("batch per process, valid tokens", f"{TRL011}/trainer/ppo_trainer.py:1166-1192"),
    reward_whitening=("optional", f"{TRL011}/trainer/ppo_trainer.py (whiten_rewards)"),
    advantages_outside=("left", f"{TRL011}/core.py:144-169 (masked_whiten does not zero)"),
    pg_agg=("token-mean", f"{TRL011}/trainer/ppo_trainer.py:1244-1251"),
    log_ratio_clamp=(None, f"{TRL011}/trainer/ppo_trainer.py:1244-1251"),
    log_ratio_masked=(False, f"{TRL011}/trainer/ppo_trainer.py:1244-1251"),
    dual_clip=(None, f"{TRL011}/trainer/ppo_trainer.py:1244-1251"),
    value_clip=(0.2, f"{TRL011}/trainer/ppo_config.py (cliprange_value)"),
    value_mask=("valid", f"{TRL011}/trainer/ppo_trainer.py:1244-1251"),
    entropy_logits=("raw", f"{TRL011}/core.py (entropy_from_logits)"),
    adaptive_kl_input=("seq_sum", f"{TRL011}/trainer/ppo_trainer.py:881-884, 1300-1302"),
)

OPENRLHF = _profile(
    "openrlhf", "OpenRLHF/OpenRLHF",
    "0.11.2 (read and run); 0.11.0 differs: no k3 log-ratio clamp, raw-logit entropy",
    logprob_temperature=(
        "divide",
        f"{ORLHF}/models/utils.py:172-174; trainer/ray/launcher.py:116 (OpenRLHF#853)",
    ),
    kl_names=((("k1", "k1"), ("k2", "k2"), ("k3", "k3")), f"{ORLHF}/models/utils.py:69-113"),
    kl_log_ratio_clamp=((-10.0, None), f"{ORLHF}/models/utils.py:108 (none in 0.11.0)"),
    kl_log_ratio_clamp_kinds=(("k3",), f"{ORLHF}/models/utils.py:108 (k3: d clamped at min -10; not in 0.11.0)"),
    kl_result_clamp=(10.0, f"{ORLHF}/models/utils.py:69-113"),
    kl_clamp_kinds=(("k1", "k2", "k3"), f"{ORLHF}/models/utils.py:69-113"),
    score_clip=(10.0, f"{ORLHF}/models/utils.py:131-145; cli/train_ppo_ray.py:474 (--reward.clip_range -10 10)"),
    mask_rule=("through_eos", f"{ORLHF}/trainer/ppo_utils/samples_generator.py:249-263"),
    score_position=("last_valid", f"{ORLHF}/models/utils.py:131-155"),
    empty_row=("wraps_to_last", f"{ORLHF}/models/utils.py:131-155 (argmax of an all-zero row; OpenRLHF#1239)"),
    missing_eos=("none", f"{ORLHF}/trainer/ppo_utils/length_penalty.py"),
    after_eos=("masked", f"{ORLHF}/trainer/ppo_utils/samples_generator.py:249-263"),
    value_extra=(0, f"{ORLHF}/trainer/ppo_utils/experience_maker.py:343-387"),
    gae_hole=("zero", f"{ORLHF}/trainer/ppo_utils/experience_maker.py:343-387"),
    whiten_var=("biased", f"{ORLHF}/trainer/ppo_utils/experience_maker.py:324-338"),
    whiten_eps=(1e-08, f"{ORLHF}/trainer/ppo_utils/experience_maker.py:324-338"),
    whiten_eps_mode=("clamp", f"{ORLHF}/trainer/ppo_utils/experience_maker.py:324-338"),
    masked_mean_eps=(0.0, f"{ORLHF}/trainer/ppo_utils/experience_maker.py:324-338"),
    whiten_scope=("all experiences of the step (global)", f"{ORLHF}/trainer/ppo_utils/experience_maker.py:324-338"),
    reward_whitening=("off", f"{ORLHF} (none)"),
    advantages_outside=("left", f"{ORLHF}/trainer/ppo_utils/experience_maker.py:336-338"),
    pg_agg=("token-mean", f"{ORLHF}/models/loss.py:11-39"),
    log_ratio_clamp=(20.0, f"{ORLHF}/models/loss.py:174-220"),
    log_ratio_masked=(False, f"{ORLHF}/models/loss.py:174-220"),
    dual_clip=(None, f"{ORLHF}/models/loss.py:174-220 (off by default)"),
    value_clip=(0.5, f"{ORLHF}/models/loss.py:262-298 (--critic.value_clip 0.5)"),
    value_mask=("valid", f"{ORLHF}/models/loss.py:262-298"),
    entropy_logits=("tempered", f"{ORLHF}/models/actor.py:268-278 (tempered since OpenRLHF#1319; raw in 0.11.0)"),
    adaptive_kl_input=("seq_sum", f"{ORLHF}/trainer/ppo_utils/kl_controller.py"),
)

VERL_PROFILE = _profile(
    "verl", "volcengine/verl",
    ">=0.4.1 (verl#2337 GAE skip); read at 0.8.0.dev (b178a3c), core functions run at 0.9.1",
    logprob_temperature=("divide", f"{VERL}/workers/actor/dp_actor.py:259, 368"),
    kl_names=(
        (("kl", "k1"), ("k1", "k1"), ("abs", "abs"), ("mse", "k2"), ("k2", "k2"), ("low_var_kl", "k3"), ("k3", "k3"),
         ("k1+", "k1"), ("k2+", "k2"), ("k3+", "k3"), ("low_var_kl+", "k3")),
        f"{VERL9}/trainer/ppo/core_algos.py:2188-2250 ('+' names crashed before verl#6058)",
    ),
    kl_log_ratio_clamp=((-20.0, 20.0), f"{VERL9}/trainer/ppo/core_algos.py:2237-2243"),
    kl_log_ratio_clamp_kinds=(("k3",), f"{VERL9}/trainer/ppo/core_algos.py:2237-2243"),
    kl_result_clamp=(10.0, f"{VERL9}/trainer/ppo/core_algos.py:2237-2243"),
    kl_clamp_kinds=(("k3",), f"{VERL9}/trainer/ppo/core_algos.py:2237-2243"),
    score_clip=(None, f"{VERL}/workers/reward_manager/naive.py (no clip)"),
    mask_rule=("through_eos", f"{VERL}/utils/torch_functional.py:342-362 (get_response_mask)"),
    score_position=("last_valid", f"{VERL9}/workers/reward_manager/naive.py:153"),
    empty_row=("wraps_to_last", f"{VERL}/workers/reward_manager/naive.py:70 (index -1; verl PR #6310)"),
    missing_eos=("none", f"{VERL} (DAPO overlong reward, separate)"),
    after_eos=("masked", f"{VERL}/utils/torch_functional.py:342-362"),
    value_extra=(0, f"{VERL}/workers/critic/dp_critic.py:185-188 (verl#50)"),
    gae_hole=("skip", f"{VERL9}/trainer/ppo/core_algos.py:216-265 (verl#2337)"),
    whiten_var=("unbiased", f"{VERL9}/utils/torch_functional.py:311-327"),
    whiten_eps=(1e-08, f"{VERL9}/utils/torch_functional.py:329-345"),
    whiten_eps_mode=("add", f"{VERL9}/utils/torch_functional.py:329-345"),
    masked_mean_eps=(1e-08, f"{VERL9}/utils/torch_functional.py:294-308"),
    whiten_scope=("the whole driver batch (global)", f"{VERL}/trainer/ppo/ray_trainer.py (compute_advantage)"),
    reward_whitening=("off", f"{VERL} (none)"),
    advantages_outside=("left", f"{VERL}/utils/torch_functional.py:322-339; core_algos.py:215-262 (skip carries A)"),
    pg_agg=("token-mean", f"{VERL9}/trainer/ppo/core_algos.py:1140-1210"),
    log_ratio_clamp=(20.0, f"{VERL9}/trainer/ppo/core_algos.py:1336-1365"),
    log_ratio_masked=(False, f"{VERL9}/trainer/ppo/core_algos.py:1336-1365"),
    dual_clip=(3.0, f"{VERL9}/trainer/ppo/core_algos.py:1336-1365"),
    value_clip=(0.5, f"{VERL9}/trainer/ppo/core_algos.py:2172-2186"),
    value_mask=("valid", f"{VERL9}/trainer/ppo/core_algos.py:2172-2186"),
    entropy_logits=("tempered", f"{VERL}/workers/actor/dp_actor.py:373"),
    adaptive_kl_input=("seq_token_mean", f"{VERL9}/trainer/ppo/ray_trainer.py:100-109"),
)

DEEPSPEED_CHAT = _profile(
    "deepspeed-chat", "deepspeedai/DeepSpeedExamples (DeepSpeed-Chat)",
    "master (2023-2026)",
    logprob_temperature=("none", f"{DSC}:38-41, 81-82"),
    kl_names=((("k1", "k1"),), f"{DSC}:66, 184"),
    kl_log_ratio_clamp=(None, f"{DSC}:181-194"),
    kl_log_ratio_clamp_kinds=((), f"{DSC}:181-194"),
    kl_result_clamp=(None, f"{DSC}:181-194"),
    kl_clamp_kinds=((), f"{DSC}:181-194"),
    score_clip=(5.0, f"{DSC}:67, 181-194 (clip_reward_value = 5)"),
    mask_rule=("non_pad", f"{DSC}:181-194 (attention_mask = seq != pad)"),
    score_position=("after_last_valid", f"{DSC}:181-194 (DeepSpeedExamples PR #672)"),
    empty_row=("slot_0", f"{DSC}:181-194 (ends = start + 1)"),
    missing_eos=("none", f"{DSC}:181-194"),
    after_eos=("masked", f"{DSC}:215-220"),
    value_extra=(1, f"{DSC}:215-220"),
    gae_hole=("none", f"{DSC}:308-320"),
    whiten_var=("none", f"{DSC}:308-320"),
    whiten_eps=(0.0, f"{DSC}:308-320"),
    whiten_eps_mode=("add", f"{DSC}:308-320"),
    masked_mean_eps=(0.0, f"{DSC}:282-306"),
    whiten_scope=("no whitening", f"{DSC}:308-320"),
    reward_whitening=("off", f"{DSC}:181-194"),
    advantages_outside=(
        "left",
        f"{DSC}:215-220, 308-320 (the ends-1 slot keeps its advantage; DeepSpeedExamples PR #672)",
    ),
    pg_agg=("token-mean", f"{DSC}:282-290"),
    log_ratio_clamp=(None, f"{DSC}:282-290"),
    log_ratio_masked=(True, f"{DSC}:282-290"),
    dual_clip=(None, f"{DSC}:282-290"),
    value_clip=(0.2, f"{DSC}:292-306"),
    value_mask=("valid", f"{DSC}:292-306"),
    entropy_logits=("none", f"{DSC} (no entropy term)"),
    adaptive_kl_input=("fixed", f"{DSC}:66 (fixed kl_ctl = 0.1)"),
)

PROFILES: dict[str, Convention] = {c.name: c for c in (MINICAI, LM_HUMAN_PREFERENCES, TRL_PPO, TRL_PPO_011, OPENRLHF,
                                                       VERL_PROFILE, DEEPSPEED_CHAT)}


def get(name: str) -> Convention:
    """The profile called `name` (ValueError naming the known ones otherwise)."""
    if name not in PROFILES:
        raise ValueError(f"unknown convention {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def diff(a: Convention, b: Convention) -> list[tuple[str, object, object]]:
    """The axes on which two conventions differ: [(axis, a's value, b's value)]."""
    return [(f, getattr(a, f), getattr(b, f)) for f in AXIS_FIELDS if getattr(a, f) != getattr(b, f)]
