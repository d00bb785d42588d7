"""The preference model (paper section 4.1): a language-model trunk with a scalar head, trained on AI feedback.

A conversation (prompt + response) is rendered with the PM's own chat template and run through the trunk; the
score is the head applied to the final hidden state of the last real token, i.e. the last position whose attention
mask is 1. With a ChatML template that token is the "\\n" after the assistant's <|im_end|> (the end of the rendered
conversation); with Llama 3 it is <|eot_id|>. Because positions follow the mask, the score is the same with left
padding, right padding or no padding.

Training minimises the soft-label Bradley-Terry loss -[p log s(rA - rB) + (1 - p) log s(rB - rA)] (losses.py),
p = the feedback model's P(A is better). After training, the scores can be normalised to mean 0 and standard deviation
1 on a calibration set of the policy's own samples, as lm-human-preferences does (`offset` and `scale`, stored in
reward_config.json and already applied by forward/values: score = (head - offset) / scale). The RL stage then sees
rewards centred on its starting policy, on a scale that does not depend on the PM, so the KL coefficient beta means
the same for every PM. The head runs in float32, also under autocast.

On disk a PM is a normal HF model directory (the trunk, still a working causal LM) plus reward_head.safetensors
and reward_config.json: `RewardModel.from_pretrained(dir)` or `load_reward_model(dir)` loads it in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from minicai import MinicaiError, distributed, precision
from minicai.data import atomic_write, atomic_write_json, read_json
from minicai.losses import bradley_terry_loss, last_token_index, preference_accuracy
from minicai.model import Transformer, shared_prefix_length
from minicai.run import check_finite
from minicai.sampling import pad_rows

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """trunk (Transformer) + head nn.Linear(hidden, 1). The head is kept in float32 whatever the trunk's dtype."""

    def __init__(self, trunk: Transformer, offset: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.hidden_size, 1).to(device=trunk.device, dtype=torch.float32)
        self.offset = float(offset)  # subtracted from every score (mean 0 on the policy's samples)
        self.scale = float(scale)  # then divided into it (standard deviation 1 on the policy's samples)

    @property
    def device(self) -> torch.device:
        return self.trunk.device

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix=None) -> torch.Tensor:
        """The head at every position: [B, T] ids and mask -> [B, T] float32 (PPO's value model reads these).
        prefix: optional token ids [L] every row starts with, computed once on the CPU (fast.FlatRows)."""
        hidden = self.trunk.hidden_states(input_ids, attention_mask, prefix=prefix)  # [B, T, D]
        return self._score(hidden)

    def _score(self, hidden: torch.Tensor) -> torch.Tensor:
        """(head(hidden) - offset) / scale: [..., D] -> [...], in the head's float32 even under autocast."""
        with torch.autocast(hidden.device.type, enabled=False):
            return (self.head(hidden.to(self.head.weight.dtype)).squeeze(-1) - self.offset) / self.scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix=None) -> torch.Tensor:
        """Scores [B] float32, read at the last token with attention_mask == 1 in each row."""
        hidden = self.trunk.hidden_states(input_ids, attention_mask, prefix=prefix)  # [B, T, D]
        last = last_token_index(attention_mask)  # [B]
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, D]
        return self._score(h)

    @classmethod
    def from_lm(cls, lm: Transformer, head_init: str = "zero", seed: int = 0) -> "RewardModel":
        """A PM initialised from a language model (the paper starts PMs from pretrained LMs; here, the SL-CAI model).

        head_init: "zero" (the default: all scores start at 0) or "normal" (weights ~ N(0, 1/(hidden+1)), bias 0,
        seeded; the initialisation of lm-human-preferences and its reproductions).
        Why zero by default: the PM starts at exactly "no preference" (every score 0, the Bradley-Terry loss log 2
        whatever the pair), so its first numbers depend on the language model alone, not on a random draw. The cost:
        the trunk's gradient is proportional to the head's weights, so the first optimiser step moves only the head
        (the trunk follows from the second step, out of hundreds). "normal" trains the trunk from the first step but
        starts from random preferences of roughly unit scale."""
        rm = cls(lm)
        with torch.no_grad():
            rm.head.bias.zero_()
            if head_init == "zero":
                rm.head.weight.zero_()
            elif head_init == "normal":
                gen = torch.Generator().manual_seed(seed)
                std = 1.0 / math.sqrt(lm.config.hidden_size + 1)
                rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=gen) * std)
            else:
                raise MinicaiError(f"head_init {head_init!r}: use 'zero' or 'normal'")
        return rm

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        fast: bool = False) -> "RewardModel":
        """Load a PM directory written by save_pretrained: HF layout + reward_head.safetensors + reward_config.json."""
        from safetensors.torch import load_file

        path = Path(path)
        head_file, config_file = path / HEAD_FILE, path / CONFIG_FILE
        if not head_file.is_file() or not config_file.is_file():
            raise MinicaiError(f"{path}: not a preference model directory (no {HEAD_FILE} / {CONFIG_FILE}). "
                               "Fix: pass the model/ folder written by train_pm.py (e.g. runs/pm/model).")
        cfg = read_json(config_file, "re-run train_pm.py")
        trunk = Transformer.from_pretrained(path, dtype=dtype, device=device, fast=fast)
        rm = cls(trunk, offset=float(cfg.get("offset", 0.0)), scale=float(cfg.get("scale", 1.0)))
        state = load_file(str(head_file))
        if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != (1, trunk.config.hidden_size):
            raise MinicaiError(f"{head_file}: expected 'weight' [1, {trunk.config.hidden_size}] and 'bias' [1]; "
                               "the head does not match this trunk (re-run train_pm.py)")
        rm.head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        rm.head.to(device)
        return rm.eval()

    def save_pretrained(self, path) -> None:
        """The trunk in HF layout (config.json + model.safetensors), the head, and reward_config.json."""
        from safetensors.torch import save_file

        path = Path(path)
        self.trunk.save_pretrained(path)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.head.state_dict().items()}
        atomic_write(path / HEAD_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        cfg = {
            "offset": self.offset,
            "scale": self.scale,
            "hidden_size": self.trunk.config.hidden_size,
            "score_position": "last token with attention mask 1 (end of the chat-rendered conversation)",
            "offset_note": "score = (head - offset) / scale, already applied by RewardModel.forward/values; do not "
                           "apply it again",
        }
        atomic_write_json(path / CONFIG_FILE, cfg)


def load_reward_model(path, dtype: torch.dtype = torch.float32, device="cpu", fast: bool = False):
    """(RewardModel, ChatTokenizer) from a PM directory, in one call."""
    from minicai.tokenizer import ChatTokenizer

    return RewardModel.from_pretrained(path, dtype=dtype, device=device, fast=fast), ChatTokenizer.from_dir(path)


# ---------------------------------------------------------------------------------------------------------------------
# Batches


def conversation_ids(tok, prompt: str, response: str, max_len: int | None = None) -> list[int]:
    """The conversation [user: prompt, assistant: response] in the PM's chat template, as token ids.

    The response is stripped of surrounding whitespace here, the one place every PM input passes through: the PM's
    training pairs are stripped when they are sampled (train_pm.py), and RL responses decoded from the policy's
    tokens (ppo.score_with_pm) must reach the PM in the same form, or the PM scores text unlike what it learnt on.
    If longer than max_len, the start is dropped (the end, where the score is read, is kept)."""
    ids = tok.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}])
    return ids[-max_len:] if max_len is not None and len(ids) > max_len else ids


@torch.no_grad()
def score_conversations(rm: RewardModel, tok, prompts: list[str], responses: list[str], batch_size: int = 8,
                        max_len: int | None = None) -> torch.Tensor:
    """PM scores [N] (float32, CPU) of prompt/response pairs, each rendered with the PM's own chat template."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [conversation_ids(tok, p, r, max_len) for p, r in zip(prompts, responses)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    out = torch.zeros(len(rows), dtype=torch.float32)
    was_training = rm.training
    rm.eval()
    for s in range(0, len(rows), batch_size):
        idx = order[s : s + batch_size]
        # the conversations' shared opening (chat template, system message) runs once per batch, not once per row
        n = shared_prefix_length([rows[i] for i in idx])
        prefix = rows[idx[0]][:n] if n else None
        ids, mask = pad_rows([rows[i][n:] for i in idx], tok.pad_id, "right")
        out[torch.tensor(idx)] = rm(ids.to(rm.device), mask.to(rm.device), prefix=prefix).float().cpu()
    rm.train(was_training)
    return out


def pair_scores(rm: RewardModel, tok, records: list[dict],
                max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_a [B], r_b [B]) for comparison records {prompt, response_a, response_b}, in one forward pass of 2B rows."""
    rows = [conversation_ids(tok, r["prompt"], r["response_a"], max_len) for r in records]
    rows += [conversation_ids(tok, r["prompt"], r["response_b"], max_len) for r in records]
    ids, mask = pad_rows(rows, tok.pad_id, "right")
    scores = rm(ids.to(rm.device), mask.to(rm.device))  # [2B]
    return scores[: len(records)], scores[len(records):]


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class PMTrainConfig:
    epochs: int = 1
    batch_size: int = 4  # comparison pairs per step (2 sequences each)
    lr: float = 1e-5  # the trunk's learning rate
    head_lr: float | None = None  # the fresh scalar head's learning rate (None: same as lr)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate
    grad_clip: float = 1.0
    max_len: int = 384  # tokens per conversation (longer ones lose their start)
    seed: int = 0


def train_preference_model(rm: RewardModel, tok, records: list[dict], config: PMTrainConfig,
                           on_step: Callable[[dict], None] | None = None,
                           amp_dtype: torch.dtype | None = None) -> list[dict]:
    """Train the PM on labelled comparisons {prompt, response_a, response_b, p_a} with the soft-label Bradley-Terry
    loss (AdamW, gradient clipping, seeded shuffles). Calls on_step(metrics) after every step; returns all metrics.
    Mixed precision (precision.py): float32 weights, the forward passes under autocast in amp_dtype (bf16/fp16; None:
    no autocast). Under torchrun every process takes pairs r, r + W, ... of each batch; the loss is the mean over
    the whole batch (gradients summed), so W processes make one process's update; the metrics are global."""
    if not records:
        raise MinicaiError("no labelled comparisons to train the preference model on")
    precision.check_trainable(rm, "the preference model")
    head = [p for p in rm.head.parameters() if p.requires_grad]
    trunk = [p for p in rm.trunk.parameters() if p.requires_grad]
    params = head + trunk
    base_lrs = [config.head_lr if config.head_lr is not None else config.lr, config.lr]
    optimizer = torch.optim.AdamW([{"params": head, "lr": base_lrs[0]}, {"params": trunk, "lr": base_lrs[1]}],
                                  weight_decay=config.weight_decay)
    scaler = precision.grad_scaler(rm.device, amp_dtype)  # fp16 only: loss scaling
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(records) / config.batch_size)
    history, step = [], 0
    rm.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(records), generator=gen).tolist()
        for s in range(steps_per_epoch):
            batch = [records[i] for i in order[s * config.batch_size : (s + 1) * config.batch_size]]
            n_all, batch = len(batch), [batch[i] for i in distributed.my_rows(len(batch))]  # this process's pairs
            scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * scale
            lr = config.lr * scale
            optimizer.zero_grad(set_to_none=True)
            if batch:
                with precision.autocast(rm.device, amp_dtype):
                    r_a, r_b = pair_scores(rm, tok, batch, config.max_len)
                p_a = torch.tensor([r["p_a"] for r in batch], dtype=torch.float32, device=r_a.device)
                loss = bradley_terry_loss(r_a, r_b, p_a)
                scaler.scale(loss * (len(batch) / n_all) if distributed.active() else loss).backward()
                loss_value = float(loss.detach()) * len(batch)
                decided = float((p_a != 0.5).sum())  # accuracy leaves out pairs without a preference
                correct = preference_accuracy(r_a.detach(), r_b.detach(), p_a) * decided if decided else 0.0
            else:
                loss_value = correct = decided = 0.0
            distributed.all_reduce_grads(params)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip else None
            check_finite("pm", step + 1, loss=loss,  # NaN/inf: stop before the update (fp16: the scaler's job)
                         grad_norm=None if scaler.is_enabled() else grad_norm)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            metrics = {"step": step, "epoch": epoch, "loss": distributed.total(loss_value) / n_all, "lr": lr,
                       "accuracy": (distributed.total(correct) / distributed.total(decided)
                                    if distributed.total(decided) else float("nan")),
                       "grad_norm": float(grad_norm) if grad_norm is not None else None}
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    rm.eval()
    return history


def normalize_scores(rm: RewardModel, raw_scores: list[float]) -> None:
    """Set rm.offset and rm.scale so that `raw_scores` (scores of a calibration set computed with offset 0 and scale
    1, e.g. the policy's held-out samples) get mean 0 and standard deviation 1, as lm-human-preferences normalises
    its reward model before RL. Fewer than 2 scores, or scores that are all equal, leave the scale at 1."""
    if not raw_scores:
        return
    x = torch.tensor(raw_scores, dtype=torch.float64)
    std = float(x.std()) if len(x) > 1 else 0.0
    rm.offset = float(x.mean())
    rm.scale = std if std > 1e-6 else 1.0


@torch.no_grad()
def evaluate_preference_model(rm: RewardModel, tok, records: list[dict], batch_size: int = 8,
                              max_len: int | None = None, bins: int = 5) -> dict:
    """Held-out metrics of the PM on labelled comparisons.

    accuracy     share where the PM ranks the labelled-better response strictly higher (ties wrong; p_a = 0.5 skipped)
    mean_margin  mean of r_better - r_worse (positive when the PM agrees with the label)
    loss         soft-label Bradley-Terry loss
    calibration  the PM's predicted P(A) = sigmoid(rA - rB) in `bins` equal-width bins: count, mean predicted,
                 mean label p_a; `calibration_error` = count-weighted mean |predicted - label| over bins
    r_a, r_b     the raw scores (lists), e.g. for the mean-0 offset"""
    was_training = rm.training
    rm.eval()
    r_a, r_b = [], []
    for s in range(0, len(records), batch_size):
        a, b = pair_scores(rm, tok, records[s : s + batch_size], max_len)
        r_a.append(a.float().cpu())
        r_b.append(b.float().cpu())
    rm.train(was_training)
    if not records:
        return {"n": 0}
    r_a, r_b = torch.cat(r_a).double(), torch.cat(r_b).double()
    p_a = torch.tensor([r["p_a"] for r in records], dtype=torch.float64)
    decided = p_a != 0.5
    margin = torch.where(p_a > 0.5, r_a - r_b, r_b - r_a)[decided]
    predicted = torch.sigmoid(r_a - r_b)
    table = []
    which = torch.clamp((predicted * bins).long(), max=bins - 1)
    for k in range(bins):
        sel = which == k
        if sel.any():
            table.append({"bin": [k / bins, (k + 1) / bins], "count": int(sel.sum()),
                          "predicted": float(predicted[sel].mean()), "label": float(p_a[sel].mean())})
    ece = sum(row["count"] * abs(row["predicted"] - row["label"]) for row in table) / len(records)
    return {
        "n": len(records),
        "accuracy": preference_accuracy(r_a, r_b, p_a),
        "mean_margin": float(margin.mean()) if len(margin) else float("nan"),
        "loss": float(bradley_terry_loss(r_a, r_b, p_a)),
        "calibration": table,
        "calibration_error": float(ece),
        "r_a": r_a.tolist(),
        "r_b": r_b.tolist(),
    }
