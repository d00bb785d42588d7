"""Dump one iteration of TRL's PPO trainer (trl.experimental.ppo, written against trl 1.12.0) for the checker.

    python3 -m minicai.oracle.trl_ppo OUT.safetensors      # a tiny random model on the CPU, about 10 s

The trainer's `train` is one long function whose intermediate tensors are locals, so this module reads them with a
line tracer on that function alone: it locates three statements by their text (not their line numbers), copies the
locals when they are about to run, and stops the trainer after the first micro-batch. Nothing in TRL is modified.
  before `advantages = masked_whiten(advantages, ...)`   logprobs, ref_logprobs, values, scores, kl, rewards,
                                                           advantages (raw), returns, padding masks, responses
  before the PPO epoch loop                               advantages (whitened)
  before `approxkl = ...` in the first micro-batch        new log-probs and values, losses, entropy
Requires trl, transformers, datasets and accelerate (not minicai dependencies)."""

import inspect
import sys
from pathlib import Path

import torch

from minicai.oracle.check import write_dump
from minicai.oracle.tiny_models import EOS_ID, PAD_ID, VOCAB
from minicai.oracle.tiny_models import models as _models
from minicai.oracle.tiny_models import tokenizer as _tokenizer


class _Stop(Exception):
    """Raised from the tracer to end the trainer after the first micro-batch."""

def _line_of(code, text: str) -> int:
    lines, start = inspect.getsourcelines(code)
    for i, line in enumerate(lines):
        if line.strip().startswith(text):
            return start + i
    raise RuntimeError(f"TRL's PPOTrainer.train has no line starting with {text!r}: another TRL version?")


def run(out: str | Path, seed: int = 3, batch: int = 8, response_length: int = 8, temperature: float = 0.7,
        kl_coef: float = 0.05, workdir: str | Path | None = None) -> dict:
    """Run TRL's PPO for one iteration and write OUT.safetensors + OUT.json; returns the captured locals."""
    import tempfile

    import trl
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo.ppo_trainer import forward

    tok = _tokenizer()
    policy, ref, value, reward = _models(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, len(VOCAB), (int(n),), generator=g).tolist()
               for n in torch.randint(2, 5, (batch,), generator=g)]
    data = Dataset.from_dict({"input_ids": prompts})
    workdir = workdir or tempfile.mkdtemp(prefix="trl_ppo_")
    args = PPOConfig(output_dir=str(workdir), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=1, total_episodes=batch, response_length=response_length,
                     local_rollout_forward_batch_size=batch, temperature=temperature, stop_token="eos",
                     kl_coef=kl_coef, kl_estimator="k1", missing_eos_penalty=None, num_sample_generations=0,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, seed=seed, save_strategy="no",
                     logging_strategy="no", learning_rate=1e-3)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value)
    code = PPOTrainer.train.__code__
    at_whiten = _line_of(code, "advantages = masked_whiten(advantages")
    at_epochs = _line_of(code, "for ppo_epoch_idx in range(")
    at_stats = _line_of(code, "approxkl = 0.5 *")
    got: dict = {}

    def local_tracer(frame, event, arg):
        if event == "line":
            if frame.f_lineno == at_whiten and "rollout" not in got:
                got["rollout"] = {k: v for k, v in frame.f_locals.items() if isinstance(v, torch.Tensor)}
                ctx, pad = frame.f_locals["context_length"], frame.f_locals["processing_class"].pad_token_id
                with torch.no_grad():  # the raw logits predicting each response token, before any update
                    out_ = forward(frame.f_locals["model"].policy, frame.f_locals["query_responses"], pad)
                    got["logits"] = out_.logits[:, ctx - 1 : -1].clone()
            elif frame.f_lineno == at_epochs and "whitened" not in got:
                got["whitened"] = frame.f_locals["advantages"].clone()
            elif frame.f_lineno == at_stats and "train" not in got:
                got["train"] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                for k, v in frame.f_locals.items() if isinstance(v, (torch.Tensor, int, float))}
                got["micro_batch_inds"] = frame.f_locals["micro_batch_inds"]
                raise _Stop
        return local_tracer

    def tracer(frame, event, arg):
        return local_tracer if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        trainer.train()
    except _Stop:
        pass
    finally:
        sys.settrace(old)
    if "train" not in got:
        raise RuntimeError("the tracer did not reach the first micro-batch; is this trl 1.12?")
    _write(out, got, args, trl.__version__, temperature, kl_coef)
    return got


def _write(out, got, args, version, temperature, kl_coef) -> None:
    r, tr = got["rollout"], got["train"]
    valid = ~r["padding_mask"]  # [B, T] the policy loss's tokens
    inds = torch.as_tensor(got["micro_batch_inds"])
    order = torch.empty_like(inds)
    order[inds] = torch.arange(len(inds))  # micro-batch row -> batch row (the first micro-batch is the batch)
    logits = got["logits"]
    tensors = {
        "response_mask": valid.to(torch.float32),
        "response_ids": r["responses"],
        "logits": logits.float(),
        "old_logprobs": r["logprobs"], "ref_logprobs": r["ref_logprobs"], "values": r["values"],
        "scores": r["scores"], "kl": r["kl"], "token_rewards": r["rewards"],
        "advantages_raw": r["advantages"], "returns": r["returns"], "advantages": got["whitened"],
        "new_logprobs": tr["new_logprobs"][order], "new_values": tr["vpred"][order],
        "pg_loss_tokens": (tr["pg_loss_max"] * valid[inds].float())[order],
        "pg_loss": tr["pg_loss"].reshape(()), "vf_loss": tr["vf_loss"].reshape(()),
        "entropy_tokens": (tr["entropy"] * valid[inds].float())[order],
        "truncated": (~(r["responses"] == EOS_ID).any(1)).to(torch.float32),
    }
    tensors = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in tensors.items()}
    meta = {"framework": "trl", "version": version, "trainer": "trl.experimental.ppo.PPOTrainer",
            "convention": "trl-ppo", "dtype": "float32", "temperature": temperature, "kl_coef": kl_coef,
            "kl_estimator": "k1", "gamma": args.gamma, "lam": args.lam, "clip_low": args.cliprange,
            "value_clip": args.cliprange_value, "loss_agg_mode": "token-mean", "missing_eos_penalty": None,
            "whiten_advantages": True, "first_minibatch": True, "eos_id": EOS_ID, "pad_id": PAD_ID}
    write_dump(out, tensors, meta)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python3 -m minicai.oracle.trl_ppo OUT.safetensors", file=sys.stderr)
        sys.exit(2)
    try:
        run(sys.argv[1])
    except ImportError as err:
        print(f"error: {err} (fix: pip install trl==1.12.0 datasets accelerate, without upgrading torch)",
              file=sys.stderr)
        sys.exit(2)
    print(f"wrote {sys.argv[1]} and {Path(sys.argv[1]).with_suffix('.json')}")
