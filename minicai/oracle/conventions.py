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
DSC = "deepspeedai/DeepSpeedExamples@45b4b71:applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py"
MINI = "minicai/losses.py"

MINICAI = Convention(
    name="minicai", framework="minicai", versions="this repository",
    logprob_temperature="divide", kl_names=(("k1", "k1"), ("abs", "abs"), ("k2", "k2"), ("k3", "k3")),
    kl_log_ratio_clamp=None, kl_log_ratio_clamp_kinds=(), score_clip=None, kl_result_clamp=None, kl_clamp_kinds=(),
    mask_rule="through_eos", score_position="last_valid", empty_row="error", missing_eos="add", after_eos="masked", value_extra=0, gae_hole="end",
    whiten_var="unbiased", whiten_eps=1e-8, whiten_eps_mode="add", masked_mean_eps=0.0,
    whiten_scope="the tensor the caller passes", reward_whitening="off", advantages_outside="zero", pg_agg="token-mean",
    log_ratio_clamp=None, log_ratio_masked=False, dual_clip=None, value_clip=0.2, value_mask="valid",
    entropy_logits="tempered", adaptive_kl_input="caller",
    sources={
        "logprob_temperature": f"{MINI}:token_logprobs", "kl_names": f"{MINI}:kl_penalty",
        "kl_log_ratio_clamp": f"{MINI}:kl_penalty", "kl_log_ratio_clamp_kinds": f"{MINI}:kl_penalty", "score_clip": f"{MINI}:per_token_rewards (no clip)", "kl_result_clamp": f"{MINI}:kl_penalty",
        "kl_clamp_kinds": f"{MINI}:kl_penalty", "mask_rule": "minicai/ppo.py:rollout (stop token kept)", "score_position": f"{MINI}:per_token_rewards",
        "empty_row": f"{MINI}:last_token_index (raises on an empty row)", "missing_eos": f"{MINI}:per_token_rewards", "after_eos": "minicai/ppo.py:rollout (response mask)",
        "value_extra": f"{MINI}:gae", "gae_hole": f"{MINI}:gae (hole='end')", "whiten_var": f"{MINI}:whiten",
        "whiten_eps": f"{MINI}:whiten", "whiten_eps_mode": f"{MINI}:whiten", "masked_mean_eps": f"{MINI}:masked_mean",
        "whiten_scope": "minicai/ppo.py:rollout", "reward_whitening": "minicai/ppo.py (none)",
        "advantages_outside": f"{MINI}:whiten (0 outside the mask)", "pg_agg": f"{MINI}:ppo_policy_loss", "log_ratio_clamp": f"{MINI}:ppo_policy_loss",
        "log_ratio_masked": f"{MINI}:ppo_policy_loss", "dual_clip": f"{MINI}:ppo_policy_loss",
        "value_clip": "minicai/ppo.py:PPOConfig", "value_mask": f"{MINI}:ppo_value_loss",
        "entropy_logits": f"{MINI}:entropy_from_logits (temperature)", "adaptive_kl_input": f"{MINI}:AdaptiveKLController",
    },
)

LM_HUMAN_PREFERENCES = Convention(
    name="lm-human-preferences", framework="openai/lm-human-preferences", versions="master (2019-2023)",
    logprob_temperature="divide", kl_names=(("kl", "k1"),), kl_log_ratio_clamp=None, kl_log_ratio_clamp_kinds=(), score_clip=None, kl_result_clamp=None,
    kl_clamp_kinds=(), mask_rule="all", score_position="last_column", empty_row="wraps_to_last", missing_eos="replace", after_eos="trained", value_extra=0,
    gae_hole="none", whiten_var="biased", whiten_eps=1e-8, whiten_eps_mode="add", masked_mean_eps=0.0,
    whiten_scope="each minibatch, unmasked (fixed length)", reward_whitening="on", advantages_outside="left", pg_agg="token-mean",
    log_ratio_clamp=None, log_ratio_masked=False, dual_clip=None, value_clip=0.2, value_mask="all",
    entropy_logits="tempered", adaptive_kl_input="seq_sum",
    sources={
        "logprob_temperature": f"{LMHP}/policy.py:119-124", "kl_names": f"{LMHP}/train_policy.py:150",
        "kl_log_ratio_clamp": f"{LMHP}/train_policy.py:150", "kl_log_ratio_clamp_kinds": f"{LMHP}/train_policy.py:150", "score_clip": f"{LMHP}/train_policy.py:153 (no clip)", "kl_result_clamp": f"{LMHP}/train_policy.py:150",
        "kl_clamp_kinds": f"{LMHP}/train_policy.py:150", "mask_rule": f"{LMHP}/train_policy.py:153 (fixed length)", "score_position": f"{LMHP}/train_policy.py:153",
        "empty_row": f"{LMHP}/train_policy.py:153 (fixed length: always the last column)", "missing_eos": f"{LMHP}/train_policy.py:388-390", "after_eos": f"{LMHP}/lm_tasks.py:38-44",
        "value_extra": f"{LMHP}/train_policy.py:327-336", "gae_hole": f"{LMHP}/train_policy.py:327-336",
        "whiten_var": f"{LMHP}/utils/core.py:336-341 (tf.nn.moments)", "whiten_eps": f"{LMHP}/utils/core.py:336-341",
        "whiten_eps_mode": f"{LMHP}/utils/core.py:336-341", "masked_mean_eps": f"{LMHP}/utils/core.py:336-341",
        "whiten_scope": f"{LMHP}/train_policy.py:325-338", "reward_whitening": f"{LMHP}/train_policy.py:58, 325",
        "advantages_outside": f"{LMHP}/utils/core.py:336-341 (no mask)", "pg_agg": f"{LMHP}/train_policy.py:354", "log_ratio_clamp": f"{LMHP}/train_policy.py:350-354",
        "log_ratio_masked": f"{LMHP}/train_policy.py:350-354", "dual_clip": f"{LMHP}/train_policy.py:354",
        "value_clip": f"{LMHP}/train_policy.py:344-348", "value_mask": f"{LMHP}/train_policy.py:344-348",
        "entropy_logits": f"{LMHP}/policy.py:124", "adaptive_kl_input": f"{LMHP}/train_policy.py:120-124, 221",
    },
)

TRL_PPO = Convention(
    name="trl-ppo", framework="huggingface/trl (trl.experimental.ppo)", versions=">=1.0,<=1.12 (read at 1.12.0)",
    logprob_temperature="divide_eps", kl_names=(("k1", "k1"), ("k3", "k3")), kl_log_ratio_clamp=None,
    kl_log_ratio_clamp_kinds=(), score_clip=None, kl_result_clamp=None, kl_clamp_kinds=(), mask_rule="non_pad", score_position="after_last_valid", empty_row="slot_0", missing_eos="subtract",
    after_eos="sentinel", value_extra=1, gae_hole="none", whiten_var="unbiased", whiten_eps=1e-8,
    whiten_eps_mode="add", masked_mean_eps=0.0, whiten_scope="local batch per process, valid tokens",
    reward_whitening="optional", advantages_outside="zero", pg_agg="token-mean", log_ratio_clamp=None, log_ratio_masked=False,
    dual_clip=None, value_clip=0.2, value_mask="valid_p1", entropy_logits="tempered", adaptive_kl_input="fixed",
    sources={
        "logprob_temperature": f"{TRL1}:622, 713, 822", "kl_names": f"{TRL1}:404, 773-774",
        "kl_log_ratio_clamp": f"{TRL1}:773-774", "kl_log_ratio_clamp_kinds": f"{TRL1}:773-774", "score_clip": f"{TRL1}:779 (no clip)", "kl_result_clamp": f"{TRL1}:773-774",
        "kl_clamp_kinds": f"{TRL1}:773-774", "mask_rule": f"{TRL1}:727, 764 (pad == eos drops the EOS, trl#5303 review)", "score_position": f"{TRL1}:778-779 (issues trl#1893, trl#3750)",
        "empty_row": f"{TRL1}:727, 778 (sequence_length -1: the score lands on slot 0)", "missing_eos": f"{TRL1}:758-759", "after_eos": f"{TRL1}:69, 764-766 (INVALID_LOGPROB = 1.0)",
        "value_extra": f"{TRL1}:767-769", "gae_hole": f"{TRL1}:786-796", "whiten_var": f"{TRL1}:264 (masked_whiten)",
        "whiten_eps": f"{TRL1}:264", "whiten_eps_mode": f"{TRL1}:264", "masked_mean_eps": f"{TRL1}:masked_mean",
        "whiten_scope": f"{TRL1}:797-798", "reward_whitening": f"{TRL1}:782-784", "advantages_outside": f"{TRL1}:798 (masked_fill(advantages, padding_mask, 0))", "pg_agg": f"{TRL1}:846",
        "log_ratio_clamp": f"{TRL1}:841-846", "log_ratio_masked": f"{TRL1}:841-846", "dual_clip": f"{TRL1}:841-846",
        "value_clip": "huggingface/trl@v1.12.0:trl/experimental/ppo/ppo_config.py (cliprange_value)",
        "value_mask": f"{TRL1}:837", "entropy_logits": f"{TRL1}:856", "adaptive_kl_input": f"{TRL1} (fixed kl_coef)",
    },
)

TRL_PPO_011 = Convention(
    name="trl-ppo-0.11", framework="huggingface/trl (legacy PPOTrainer)", versions=">=0.4 (trl#153),<=0.11",
    logprob_temperature="none", kl_names=(("kl", "k1"), ("abs", "abs"), ("mse", "k2"), ("full", "full")),
    kl_log_ratio_clamp=None, kl_log_ratio_clamp_kinds=(), score_clip=None, kl_result_clamp=None, kl_clamp_kinds=(), mask_rule="through_eos", score_position="last_valid",
    empty_row="error", missing_eos="none", after_eos="masked", value_extra=0, gae_hole="zero", whiten_var="unbiased", whiten_eps=1e-8,
    whiten_eps_mode="add", masked_mean_eps=0.0, whiten_scope="batch per process, valid tokens",
    reward_whitening="optional", advantages_outside="left", pg_agg="token-mean", log_ratio_clamp=None, log_ratio_masked=False, dual_clip=None,
    value_clip=0.2, value_mask="valid", entropy_logits="raw", adaptive_kl_input="seq_sum",
    sources={
        "logprob_temperature": f"{TRL011}/core.py:115-124; {TRL011}/trainer/ppo_trainer.py:1031",
        "kl_names": f"{TRL011}/trainer/ppo_trainer.py:1150-1164", "kl_log_ratio_clamp": f"{TRL011}/trainer/ppo_trainer.py:1150-1164",
        "kl_log_ratio_clamp_kinds": f"{TRL011}/trainer/ppo_trainer.py:1150-1164", "score_clip": f"{TRL011}/trainer/ppo_trainer.py:1112-1148 (no clip)", "kl_result_clamp": f"{TRL011}/trainer/ppo_trainer.py:1150-1164",
        "kl_clamp_kinds": f"{TRL011}/trainer/ppo_trainer.py:1150-1164",
        "mask_rule": f"{TRL011}/trainer/ppo_trainer.py:1031-1052 (attention mask)", "score_position": f"{TRL011}/trainer/ppo_trainer.py:1112-1148", "empty_row": f"{TRL011}/trainer/ppo_trainer.py:1112-1148 (mask.nonzero()[-1] fails on an empty row)", "missing_eos": f"{TRL011}/trainer/ppo_trainer.py (left to the user)",
        "after_eos": f"{TRL011}/trainer/ppo_trainer.py:1031-1052", "value_extra": f"{TRL011}/trainer/ppo_trainer.py:1166-1192",
        "gae_hole": f"{TRL011}/trainer/ppo_trainer.py:1166-1192", "whiten_var": f"{TRL011}/core.py:144-169 (since trl#153)",
        "whiten_eps": f"{TRL011}/core.py:144-169", "whiten_eps_mode": f"{TRL011}/core.py:144-169",
        "masked_mean_eps": f"{TRL011}/core.py:144-169", "whiten_scope": f"{TRL011}/trainer/ppo_trainer.py:1166-1192",
        "reward_whitening": f"{TRL011}/trainer/ppo_trainer.py (whiten_rewards)", "advantages_outside": f"{TRL011}/core.py:144-169 (masked_whiten does not zero)", "pg_agg": f"{TRL011}/trainer/ppo_trainer.py:1244-1251",
        "log_ratio_clamp": f"{TRL011}/trainer/ppo_trainer.py:1244-1251", "log_ratio_masked": f"{TRL011}/trainer/ppo_trainer.py:1244-1251",
        "dual_clip": f"{TRL011}/trainer/ppo_trainer.py:1244-1251", "value_clip": f"{TRL011}/trainer/ppo_config.py (cliprange_value)",
        "value_mask": f"{TRL011}/trainer/ppo_trainer.py:1244-1251", "entropy_logits": f"{TRL011}/core.py (entropy_from_logits)",
        "adaptive_kl_input": f"{TRL011}/trainer/ppo_trainer.py:881-884, 1300-1302",
    },
)

OPENRLHF = Convention(
    name="openrlhf", framework="OpenRLHF/OpenRLHF", versions="0.11.2 (read and run); 0.11.0 differs: no k3 log-ratio clamp, raw-logit entropy",
    logprob_temperature="divide", kl_names=(("k1", "k1"), ("k2", "k2"), ("k3", "k3")), kl_log_ratio_clamp=(-10.0, None),
    kl_log_ratio_clamp_kinds=("k3",), score_clip=10.0, kl_result_clamp=10.0, kl_clamp_kinds=("k1", "k2", "k3"), mask_rule="through_eos", score_position="last_valid", empty_row="wraps_to_last", missing_eos="none",
    after_eos="masked", value_extra=0, gae_hole="zero", whiten_var="biased", whiten_eps=1e-8, whiten_eps_mode="clamp",
    masked_mean_eps=0.0, whiten_scope="all experiences of the step (global)", reward_whitening="off",
    advantages_outside="left", pg_agg="token-mean", log_ratio_clamp=20.0, log_ratio_masked=False, dual_clip=None, value_clip=0.5,
    value_mask="valid", entropy_logits="tempered", adaptive_kl_input="seq_sum",
    sources={
        "logprob_temperature": f"{ORLHF}/models/utils.py:139-141; {ORLHF}/trainer/ray/launcher.py:116 (OpenRLHF#853)",
        "kl_names": f"{ORLHF}/models/utils.py:64-95", "kl_log_ratio_clamp": f"{ORLHF}/models/utils.py:115-121 (0.11.2; none in 0.11.0)",
        "kl_log_ratio_clamp_kinds": f"{ORLHF}/models/utils.py:115-121 (k3: d clamped at min -10, 0.11.2)", "score_clip": f"{ORLHF}/models/utils.py:131-145; cli/train_ppo_ray.py:474 (--reward.clip_range -10 10)", "kl_result_clamp": f"{ORLHF}/models/utils.py:64-95", "kl_clamp_kinds": f"{ORLHF}/models/utils.py:64-95",
        "mask_rule": f"{ORLHF}/trainer/ppo_utils/samples_generator.py:259-267", "score_position": f"{ORLHF}/models/utils.py:98-125", "empty_row": f"{ORLHF}/models/utils.py:98-125 (argmax of an all-zero row; OpenRLHF#1239)", "missing_eos": f"{ORLHF}/trainer/ppo_utils/length_penalty.py",
        "after_eos": f"{ORLHF}/trainer/ppo_utils/samples_generator.py:259-267",
        "value_extra": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:333-378",
        "gae_hole": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:333-378",
        "whiten_var": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:316-328",
        "whiten_eps": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:316-328",
        "whiten_eps_mode": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:316-328",
        "masked_mean_eps": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:316-328",
        "whiten_scope": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:316-328", "reward_whitening": f"{ORLHF} (none)",
        "advantages_outside": f"{ORLHF}/trainer/ppo_utils/experience_maker.py:336-338", "pg_agg": f"{ORLHF}/models/loss.py:11-38", "log_ratio_clamp": f"{ORLHF}/models/loss.py:114-230",
        "log_ratio_masked": f"{ORLHF}/models/loss.py:114-230", "dual_clip": f"{ORLHF}/models/loss.py:114-230 (off by default)",
        "value_clip": f"{ORLHF}/models/loss.py:233-269 (--critic.value_clip 0.5)", "value_mask": f"{ORLHF}/models/loss.py:233-269",
        "entropy_logits": f"{ORLHF}/models/actor.py:268-278 (tempered since OpenRLHF#1319; raw in 0.11.0)",
        "adaptive_kl_input": f"{ORLHF}/trainer/ppo_utils/kl_controller.py",
    },
)

VERL_PROFILE = Convention(
    name="verl", framework="volcengine/verl", versions=">=0.4.1 (verl#2337 GAE skip), read at 0.8.0.dev",
    logprob_temperature="divide",
    kl_names=(("kl", "k1"), ("k1", "k1"), ("abs", "abs"), ("mse", "k2"), ("k2", "k2"), ("low_var_kl", "k3"),
              ("k3", "k3"), ("k1+", "k1"), ("k2+", "k2"), ("k3+", "k3"), ("low_var_kl+", "k3")),
    kl_log_ratio_clamp=(-20.0, 20.0), kl_log_ratio_clamp_kinds=("k3",), score_clip=None, kl_result_clamp=10.0, kl_clamp_kinds=("k3",), mask_rule="through_eos", score_position="last_valid",
    empty_row="wraps_to_last", missing_eos="none", after_eos="masked", value_extra=0, gae_hole="skip", whiten_var="unbiased", whiten_eps=1e-8,
    whiten_eps_mode="add", masked_mean_eps=1e-8, whiten_scope="the whole driver batch (global)",
    reward_whitening="off", advantages_outside="left", pg_agg="token-mean", log_ratio_clamp=20.0, log_ratio_masked=False, dual_clip=3.0,
    value_clip=0.5, value_mask="valid", entropy_logits="tempered", adaptive_kl_input="seq_token_mean",
    sources={
        "logprob_temperature": f"{VERL}/workers/actor/dp_actor.py:259, 368",
        "kl_names": f"{VERL}/trainer/ppo/core_algos.py:1841-1902 ('+' names crash before verl#6058)",
        "kl_log_ratio_clamp": f"{VERL}/trainer/ppo/core_algos.py:1867-1902",
        "kl_log_ratio_clamp_kinds": f"{VERL}/trainer/ppo/core_algos.py:1867-1902", "score_clip": f"{VERL}/workers/reward_manager/naive.py (no clip)", "kl_result_clamp": f"{VERL}/trainer/ppo/core_algos.py:1867-1902",
        "kl_clamp_kinds": f"{VERL}/trainer/ppo/core_algos.py:1867-1902",
        "mask_rule": f"{VERL}/utils/torch_functional.py:342-362 (get_response_mask)", "score_position": f"{VERL}/workers/reward_manager/naive.py:70, 100", "empty_row": f"{VERL}/workers/reward_manager/naive.py:70 (index -1; verl PR #6310)", "missing_eos": f"{VERL} (DAPO overlong reward, separate)",
        "after_eos": f"{VERL}/utils/torch_functional.py:342-362", "value_extra": f"{VERL}/workers/critic/dp_critic.py:185-188 (verl#50)",
        "gae_hole": f"{VERL}/trainer/ppo/core_algos.py:215-262 (verl#2337)",
        "whiten_var": f"{VERL}/utils/torch_functional.py:304-319", "whiten_eps": f"{VERL}/utils/torch_functional.py:322-339",
        "whiten_eps_mode": f"{VERL}/utils/torch_functional.py:322-339", "masked_mean_eps": f"{VERL}/utils/torch_functional.py:287-301",
        "whiten_scope": f"{VERL}/trainer/ppo/ray_trainer.py (compute_advantage)", "reward_whitening": f"{VERL} (none)",
        "advantages_outside": f"{VERL}/utils/torch_functional.py:322-339; core_algos.py:215-262 (skip carries A)", "pg_agg": f"{VERL}/trainer/ppo/core_algos.py:1025-1081", "log_ratio_clamp": f"{VERL}/trainer/ppo/core_algos.py:1160-1250",
        "log_ratio_masked": f"{VERL}/trainer/ppo/core_algos.py:1160-1250", "dual_clip": f"{VERL}/trainer/ppo/core_algos.py:1160-1250",
        "value_clip": f"{VERL}/trainer/ppo/core_algos.py:1799-1838", "value_mask": f"{VERL}/trainer/ppo/core_algos.py:1799-1838",
        "entropy_logits": f"{VERL}/workers/actor/dp_actor.py:373", "adaptive_kl_input": f"{VERL}/trainer/ppo/ray_trainer.py:100-104",
    },
)

DEEPSPEED_CHAT = Convention(
    name="deepspeed-chat", framework="deepspeedai/DeepSpeedExamples (DeepSpeed-Chat)", versions="master (2023-2026)",
    logprob_temperature="none", kl_names=(("k1", "k1"),), kl_log_ratio_clamp=None, kl_log_ratio_clamp_kinds=(), score_clip=5.0, kl_result_clamp=None,
    kl_clamp_kinds=(), mask_rule="non_pad", score_position="after_last_valid", empty_row="slot_0", missing_eos="none", after_eos="masked", value_extra=1,
    gae_hole="none", whiten_var="none", whiten_eps=0.0, whiten_eps_mode="add", masked_mean_eps=0.0,
    whiten_scope="no whitening", reward_whitening="off", advantages_outside="left", pg_agg="token-mean", log_ratio_clamp=None,
    log_ratio_masked=True, dual_clip=None, value_clip=0.2, value_mask="valid", entropy_logits="none",
    adaptive_kl_input="fixed",
    sources={
        "logprob_temperature": f"{DSC}:38-41, 81-82", "kl_names": f"{DSC}:66, 184", "kl_log_ratio_clamp": f"{DSC}:181-194",
        "kl_log_ratio_clamp_kinds": f"{DSC}:181-194", "score_clip": f"{DSC}:67, 181-194 (clip_reward_value = 5)", "kl_result_clamp": f"{DSC}:181-194", "kl_clamp_kinds": f"{DSC}:181-194",
        "mask_rule": f"{DSC}:181-194 (attention_mask = seq != pad)", "score_position": f"{DSC}:181-194 (DeepSpeedExamples PR #672)", "empty_row": f"{DSC}:181-194 (ends = start + 1)", "missing_eos": f"{DSC}:181-194",
        "after_eos": f"{DSC}:215-220", "value_extra": f"{DSC}:215-220", "gae_hole": f"{DSC}:308-320",
        "whiten_var": f"{DSC}:308-320", "whiten_eps": f"{DSC}:308-320", "whiten_eps_mode": f"{DSC}:308-320",
        "masked_mean_eps": f"{DSC}:282-306", "whiten_scope": f"{DSC}:308-320", "reward_whitening": f"{DSC}:181-194",
        "advantages_outside": f"{DSC}:215-220, 308-320 (the ends-1 slot keeps its advantage; DeepSpeedExamples PR #672)", "pg_agg": f"{DSC}:282-290", "log_ratio_clamp": f"{DSC}:282-290", "log_ratio_masked": f"{DSC}:282-290",
        "dual_clip": f"{DSC}:282-290", "value_clip": f"{DSC}:292-306", "value_mask": f"{DSC}:292-306",
        "entropy_logits": f"{DSC} (no entropy term)", "adaptive_kl_input": f"{DSC}:66 (fixed kl_ctl = 0.1)",
    },
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
