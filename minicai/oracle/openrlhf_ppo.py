"""A dump built from OpenRLHF's published PPO functions (openrlhf 0.11.2), for the checker.

    pip install --no-deps --target DIR openrlhf==0.11.2      # the package alone; never let pip touch torch
    python3 -m minicai.oracle.openrlhf_ppo DIR OUT.safetensors

OpenRLHF's trainer needs Ray, DeepSpeed and vLLM, which do not run on a CPU-only machine. Its PPO math does not:
this module loads four of its source files as they are (models/utils.py, models/loss.py,
trainer/ppo_utils/experience_maker.py and what it imports), with empty stand-ins for the `ray`, `deepspeed` and
launcher modules those files import but the functions used here never call, and runs:
  log_probs_from_logits     policy and reference log-probs at the sampling temperature
  compute_approx_kl         the KL estimate (k3 here, with its clamps)
  compute_advantages_and_returns   (ExperienceMaker's own method: score clip, compute_reward, GAE, whitening)
  PolicyLoss, ValueLoss     the losses (first minibatch: new log-probs = old)
  compute_entropy           (the function under its torch.compile wrapper) on the tempered logits
The rollout itself (vLLM in OpenRLHF) is a plain transformers `generate` at the same temperature.
"""

from pathlib import Path
from types import SimpleNamespace

import torch

from minicai import MinicaiError
from minicai.oracle.sources import dist_version, load_sources, main, write_ppo_dump
from minicai.oracle.tiny_models import models, rollout

FILES = {  # module name -> file under the package root, loaded in this order
    "openrlhf.utils.logging_utils": "openrlhf/utils/logging_utils.py",
    "openrlhf.utils.utils": "openrlhf/utils/utils.py",
    "openrlhf.utils.seqlen_balancing": "openrlhf/utils/seqlen_balancing.py",
    "openrlhf.models.utils": "openrlhf/models/utils.py",
    "openrlhf.models.loss": "openrlhf/models/loss.py",
    "openrlhf.trainer.ppo_utils.experience": "openrlhf/trainer/ppo_utils/experience.py",
    "openrlhf.trainer.ppo_utils.length_penalty": "openrlhf/trainer/ppo_utils/length_penalty.py",
    "openrlhf.trainer.ppo_utils.experience_maker": "openrlhf/trainer/ppo_utils/experience_maker.py",
}


def load(root: str | Path) -> SimpleNamespace:
    """OpenRLHF's PPO modules from an unpacked package at `root` (the directory holding openrlhf/)."""
    root = Path(root)
    if not (root / "openrlhf" / "models" / "loss.py").is_file():
        raise MinicaiError(f"{root}: no openrlhf/models/loss.py (fix: pip install --no-deps --target {root} "
                           "openrlhf==0.11.2)")
    loaded = load_sources(
        root, ("openrlhf", "openrlhf.utils", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils",
               "openrlhf.trainer.ray"),
        {"ray": {"remote": lambda *a, **k: (lambda f: f)}, "deepspeed": {},
         "openrlhf.trainer.ray.launcher": {"RayActorGroup": object}}, FILES)
    u, loss, em = (loaded["openrlhf.models.utils"], loaded["openrlhf.models.loss"],
                   loaded["openrlhf.trainer.ppo_utils.experience_maker"])
    entropy = getattr(u.compute_entropy, "_torchdynamo_orig_callable", u.compute_entropy)  # skip torch.compile
    return SimpleNamespace(log_probs_from_logits=u.log_probs_from_logits, compute_approx_kl=u.compute_approx_kl,
                           compute_entropy=entropy, PolicyLoss=loss.PolicyLoss, ValueLoss=loss.ValueLoss,
                           experience_maker=em, version=dist_version(root, "openrlhf"))


def run(root: str | Path, out: str | Path, seed: int = 5, batch: int = 8, response_length: int = 8,
        temperature: float = 0.7, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95) -> None:
    o = load(root)
    policy, ref, value, reward = models(seed)
    r = rollout(policy, ref, seed, batch, response_length, temperature)
    seqs, P, resp, first, attn, pos, g = r.seqs, r.P, r.resp, r.first, r.attn, r.pos, r.g
    N = resp.shape[1]
    action_mask = r.resp_mask  # through the first EOS

    def response_logits(model):  # [B, N, V]: column t predicts response token t
        with torch.no_grad():
            return model(input_ids=seqs, attention_mask=attn, position_ids=pos).logits[:, P - 1 : P - 1 + N].float()

    logits = response_logits(policy)
    old = o.log_probs_from_logits(logits.clone(), resp, temperature)  # divides its argument in place
    ref_lp = o.log_probs_from_logits(response_logits(ref), resp, temperature)
    kl = o.compute_approx_kl(old, ref_lp, kl_estimator="k3")
    with torch.no_grad():
        hv = value.model(input_ids=seqs, attention_mask=attn, position_ids=pos).last_hidden_state
        values = value.score(hv)[:, P - 1 : P - 1 + N, 0].float()
        hr = reward.model(input_ids=seqs, attention_mask=attn, position_ids=pos).last_hidden_state
        last = P + first.clamp(max=N - 1)
        scores = 6.0 * reward.score(hr)[torch.arange(batch), last, 0].float()  # some beyond the +-10 clip
    exp = SimpleNamespace(rewards=scores.clone(), index=list(range(batch)), kl=kl, action_mask=action_mask.float(),
                          values=values, info={}, truncated=None, advantages=None, returns=None)
    captured = {}
    em = o.experience_maker
    real_reward = em.compute_reward
    maker_cls = next(c for c in vars(em).values()
                     if isinstance(c, type) and hasattr(c, "compute_advantages_and_returns"))

    def spy_reward(*a, **k):
        captured["token_rewards"] = real_reward(*a, **k)
        return captured["token_rewards"]

    def spy_gae(self, *a, **k):
        captured["advantages_raw"], captured["returns"] = maker_cls.get_advantages_and_returns(self, *a, **k)
        return captured["advantages_raw"], captured["returns"]

    args = SimpleNamespace(rollout=SimpleNamespace(n_samples_per_prompt=1, max_new_tokens=response_length),
                           algo=SimpleNamespace(advantage=SimpleNamespace(estimator="gae", gamma=gamma, lambd=lam,
                                                                          no_std_norm=False)),
                           reward=SimpleNamespace(clip_range=(-10.0, 10.0), overlong_buffer_len=None,
                                                  stop_properly_penalty_coef=None))
    fake = SimpleNamespace(strategy=SimpleNamespace(args=args), kl_ctl=SimpleNamespace(value=kl_coef),
                           advantage_estimator="gae")
    fake.get_advantages_and_returns = lambda *a, **k: spy_gae(fake, *a, **k)
    em.compute_reward = spy_reward
    try:
        maker_cls.compute_advantages_and_returns(fake, [exp])
    finally:
        em.compute_reward = real_reward
    new_values = values + 0.3 * torch.randn(values.shape, generator=g)
    pg_loss, clip_ratio, *_ = o.PolicyLoss(0.2, 0.2)(old.clone(), old, exp.advantages, action_mask.float())
    vf_loss = o.ValueLoss(clip_eps=0.5)(new_values, values, exp.returns, action_mask.float())
    entropy = o.compute_entropy(logits / temperature)
    tensors = {"response_mask": action_mask.float(), "response_ids": resp, "logits": logits, "old_logprobs": old,
               "ref_logprobs": ref_lp, "new_logprobs": old.clone(), "values": values, "new_values": new_values,
               "scores": scores, "kl": kl, "token_rewards": captured["token_rewards"],
               "advantages_raw": captured["advantages_raw"], "returns": captured["returns"],
               "advantages": exp.advantages, "pg_loss": pg_loss.reshape(()), "vf_loss": vf_loss.reshape(()),
               "entropy_tokens": entropy * action_mask}
    write_ppo_dump(out, tensors, {"framework": "openrlhf", "version": o.version, "temperature": temperature,
                                  "kl_coef": kl_coef, "kl_estimator": "k3", "gamma": gamma, "lam": lam,
                                  "first_minibatch": True, "rollout": "transformers generate (stands in for vLLM)"})


if __name__ == "__main__":
    main(run, "minicai.oracle.openrlhf_ppo", "OPENRLHF_ROOT")
