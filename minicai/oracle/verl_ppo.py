"""A dump built from verl's published PPO functions (verl 0.9.1), for the checker.

    pip install --no-deps --target DIR verl==0.9.1      # the package alone; never let pip touch torch
    python3 -m minicai.oracle.verl_ppo DIR OUT.safetensors

verl's trainer needs Ray (and omegaconf, tensordict, hydra), which this CPU machine does not have. Its PPO math
does not: this module loads verl/utils/torch_functional.py and verl/trainer/ppo/core_algos.py as they are, with
empty stand-ins for the modules they import at the top but the functions used here never call (omegaconf,
tensordict, verl.trainer.config, verl.workers.config, verl.utils), and runs:
  logprobs_from_logits, entropy_from_logits   on logits divided by the temperature (as dp_actor does)
  kl_penalty                                   "low_var_kl" (k3 with its clamps)
  compute_gae_advantage_return                 GAE with verl's skip rule, then masked_whiten (captured before it)
  compute_policy_loss_vanilla, agg_loss        dual-clip on, token-mean
  compute_value_loss
The glue between them follows ray_trainer.apply_kl_penalty (rewards = scores - beta * kl * mask) and the naive
reward manager (the score at the last valid token); the rollout is a transformers `generate`. One response gets an
interior masked token (a multi-turn observation), where verl's GAE differs from minicai's; the new log-probs are
those of a later minibatch (ratios up to about 4.5, where the dual-clip acts).
"""

from pathlib import Path
from types import SimpleNamespace

import torch

from minicai import MinicaiError
from minicai.oracle.sources import dist_version, load_sources, main, write_ppo_dump
from minicai.oracle.tiny_models import models, rollout


class _ActorConfig(dict):
    """What compute_policy_loss_vanilla reads from verl's ActorConfig (attributes and .get)."""

    def __getattr__(self, key):
        return self[key]


def load(root: str | Path) -> SimpleNamespace:
    root = Path(root)
    if not (root / "verl" / "trainer" / "ppo" / "core_algos.py").is_file():
        raise MinicaiError(f"{root}: no verl/trainer/ppo/core_algos.py (fix: pip install --no-deps --target {root} "
                           "verl==0.9.1)")
    loaded = load_sources(
        root, ("verl", "verl.utils", "verl.trainer", "verl.trainer.ppo", "verl.workers"),
        {"omegaconf": {"DictConfig": type("DictConfig", (), {})},
         "tensordict": {"TensorDict": type("TensorDict", (), {})},
         "verl.trainer.config": {"AlgoConfig": type("AlgoConfig", (), {})},
         "verl.workers.config": {"ActorConfig": type("ActorConfig", (), {})},
         "verl.utils": {"as_torch_index": None, "group_mean_std": None}},  # unused here
        {"verl.utils.device": "verl/utils/device.py", "verl.utils.import_utils": "verl/utils/import_utils.py",
         "verl.utils.torch_functional": "verl/utils/torch_functional.py",
         "verl.trainer.ppo.core_algos": "verl/trainer/ppo/core_algos.py"})
    loaded["verl.utils"].torch_functional = loaded["verl.utils.torch_functional"]
    return SimpleNamespace(F=loaded["verl.utils.torch_functional"], core=loaded["verl.trainer.ppo.core_algos"],
                           version=dist_version(root, "verl"))


def run(root: str | Path, out: str | Path, seed: int = 7, batch: int = 6, response_length: int = 8,
        temperature: float = 0.7, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95) -> None:
    v = load(root)
    F, core = v.F, v.core
    policy, ref, value, reward = models(seed)
    r = rollout(policy, ref, seed, batch, response_length, temperature)
    seqs, P, resp, first, attn, pos, g = r.seqs, r.P, r.resp, r.first, r.attn, r.pos, r.g
    N = resp.shape[1]
    mask = r.resp_mask.float()
    hole_row = int(torch.argmax(mask.sum(1)))  # the longest response gets a masked observation token at t = 2
    mask[hole_row, 2] = 0.0

    def logits_of(model):  # [B, N, V]: column t predicts response token t (raw)
        with torch.no_grad():
            return model(input_ids=seqs, attention_mask=attn, position_ids=pos).logits[:, P - 1 : P - 1 + N].float()

    raw = logits_of(policy)
    tempered = raw.clone().div_(temperature)  # dp_actor: logits.div_(temperature)
    old = F.logprobs_from_logits(tempered, resp)
    ref_lp = F.logprobs_from_logits(logits_of(ref).div_(temperature), resp)
    entropy = F.entropy_from_logits(tempered)
    with torch.no_grad():
        hv = value.model(input_ids=seqs, attention_mask=attn, position_ids=pos).last_hidden_state
        values = value.score(hv)[:, P - 1 : P - 1 + N, 0].float() * mask  # dp_critic: values * response_mask
        hr = reward.model(input_ids=seqs, attention_mask=attn, position_ids=pos).last_hidden_state
        scores = reward.score(hr)[torch.arange(batch), P + first.clamp(max=N - 1), 0].float()
    kld = core.kl_penalty(old, ref_lp, "low_var_kl") * mask  # ray_trainer.apply_kl_penalty
    token_scores = torch.zeros_like(old)
    last = (mask * torch.arange(N)).argmax(1)  # the naive reward manager: valid_response_length - 1
    token_scores[torch.arange(batch), last] = scores
    token_rewards = token_scores - kl_coef * kld
    captured = {}
    real_whiten = F.masked_whiten

    def spy_whiten(values_, mask_, shift_mean=True):
        captured["advantages_raw"] = values_.clone()
        return real_whiten(values_, mask_, shift_mean)

    F.masked_whiten = spy_whiten
    try:
        adv, returns = core.compute_gae_advantage_return(token_rewards, values, mask, gamma, lam)
    finally:
        F.masked_whiten = real_whiten
    new = old + torch.where(torch.arange(N) % 3 == 1, 1.5, -0.2)  # a later minibatch: ratios e^1.5 and e^-0.2
    cfg = _ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                       global_batch_info={})
    pg_loss, _ = core.compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", cfg)
    new_values = values + 0.3 * torch.randn(values.shape, generator=g)
    vf_loss, _ = core.compute_value_loss(new_values, returns, values, mask, 0.5)
    tensors = {"response_mask": mask, "response_ids": resp, "logits": raw, "old_logprobs": old,
               "ref_logprobs": ref_lp, "new_logprobs": new, "values": values, "new_values": new_values,
               "scores": scores, "kl": kld, "token_rewards": token_rewards,
               "advantages_raw": captured["advantages_raw"], "advantages": adv, "returns": returns,
               "pg_loss": pg_loss.reshape(()), "vf_loss": vf_loss.reshape(()), "entropy_tokens": entropy * mask}
    write_ppo_dump(out, tensors, {"framework": "verl", "version": v.version, "temperature": temperature,
                                  "kl_coef": kl_coef, "kl_estimator": "low_var_kl", "gamma": gamma, "lam": lam,
                                  "first_minibatch": False,
                                  "rollout": "transformers generate (stands in for vLLM/SGLang)"})


if __name__ == "__main__":
    main(run, "minicai.oracle.verl_ppo", "VERL_ROOT")
