"""Supervised fine-tuning for SL-CAI (Bai et al., 2022, section 3.1): learn the revised responses.

The training set is (red-team prompt, revision) pairs from the critique loop, by default the revisions of every
round as in the paper, mixed with (helpfulness prompt, the initial model's own answer) pairs so the fine-tuned
model stays helpful. Each pair is rendered in the chat format; the loss is the next-token cross-entropy on the
assistant's tokens only (`losses.sft_loss` with the mask from `ChatTokenizer.render_with_mask`).

Training: AdamW, linear warmup then cosine (or linear / constant) decay, gradient-norm clipping, gradient
accumulation (token-weighted, so accumulating k micro-batches equals one k-times bigger batch), a seeded shuffle
per epoch, and the held-out loss before training and after every epoch. One metrics line per optimizer step.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from minicai import MinicaiError, distributed, precision
from minicai.losses import sft_loss
from minicai.run import check_finite
from minicai.sampling import pad_rows


@dataclass
class Example:
    """One SFT example: token ids and the 0/1 loss mask (1 on the assistant's tokens)."""

    ids: list[int]  # [T]
    mask: list[int]  # [T]
    source: str  # "revision" or "helpful"


@dataclass
class SFTConfig:
    epochs: float = 1.0  # passes over the training split (ignored when steps is set)
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-5  # peak learning rate
    warmup: float = 0.1  # warmup length: a fraction of the steps if < 1, else a number of steps
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # max global grad norm (0: no clipping)
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 8
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Data


def revision_pairs(records: list[dict], use: str = "all") -> list[dict]:
    """SFT items {"source", "messages", "truncated"} of (prompt, revision) from revisions.jsonl records.

    use="all": every successful (non-empty) revision of every round, as in the paper; use="final": the last
    successful revision only. Records without any successful revision give nothing (their final response is the
    unrevised, possibly harmful answer)."""
    if use not in ("all", "final"):
        raise MinicaiError(f"--revisions {use!r}: use 'all' or 'final'.")
    out = []
    for rec in records:
        rounds = [r for r in rec.get("rounds", []) if not r.get("failed") and r.get("revision", "").strip()]
        if use == "final":
            rounds = rounds[-1:]
        out += [{"source": "revision", "truncated": bool(r.get("revision_truncated")),
                 "messages": [{"role": "user", "content": rec["prompt"]},
                              {"role": "assistant", "content": r["revision"]}]} for r in rounds]
    return out


def helpful_pairs(records: list[dict]) -> list[dict]:
    """SFT items of (helpfulness prompt, the initial model's answer) from helpful.jsonl; empty answers skipped."""
    return [{"source": "helpful", "truncated": bool(r.get("truncated")),
             "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in records if r.get("response", "").strip()]


def encode_example(tokenizer, messages: list[dict], max_len: int, source: str = "",
                   open_end: bool = False) -> Example | None:
    """Render with the assistant-only mask and cut to max_len tokens from the end (the prompt is kept, the
    response's tail is dropped). None if no assistant token survives the cut.

    open_end: the reply was cut off by the sampler's token limit, so its end-of-turn token (the last mask-1
    token) and what follows are dropped: the model must not learn to stop in mid-sentence."""
    ids, mask = tokenizer.render_with_mask(messages)
    if open_end and 1 in mask:
        last = len(mask) - 1 - mask[::-1].index(1)
        ids, mask = ids[:last], mask[:last]
    ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask[1:]) == 0:  # position 0 is never a target
        return None
    return Example(ids, mask, source)


def build_examples(tokenizer, items: list[dict], max_len: int) -> tuple[list[Example], int]:
    """Encode SFT items ({"source", "messages", "truncated"}); returns the examples and how many were dropped
    (nothing of the reply fits in max_len)."""
    out = [encode_example(tokenizer, it["messages"], max_len, it.get("source", ""), it.get("truncated", False))
           for it in items]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def split_heldout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held-out). At least one held-out example when fraction > 0 and there are >= 2."""
    if not 0 <= fraction < 1:
        raise MinicaiError(f"--heldout {fraction}: use a fraction in [0, 1).")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = int(round(fraction * len(examples)))
    if fraction > 0 and len(examples) >= 2:
        n = max(n, 1)
    held = sorted(order[:n])
    train = sorted(order[n:])
    return [examples[i] for i in train], [examples[i] for i in held]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids [B, T], attention_mask [B, T], loss_mask [B, T] (0 on padding)."""
    ids, attn = pad_rows([e.ids for e in batch], pad_id, "right")
    loss_mask, _ = pad_rows([e.mask for e in batch], 0, "right")
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens the loss counts (sft_loss ignores position 0)."""
    return int(batch["loss_mask"][:, 1:].sum().item())


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from peak/warmup to peak over `warmup`
    steps, then decay to peak*min_ratio at the last step (cosine or linear), or stay at peak (constant)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, total - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1 - progress
    else:
        raise MinicaiError(f"--schedule {schedule!r}: use cosine, linear or constant.")
    return peak * (min_ratio + (1 - min_ratio) * shape)


def warmup_steps(warmup: float, total: int) -> int:
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


# ----------------------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8,
                  amp_dtype: torch.dtype | None = None) -> float:
    """Token-weighted mean SFT loss over `examples` (nan when empty)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
        n = target_tokens(batch)
        with precision.autocast(model.device, amp_dtype):
            logits = model(batch["input_ids"], batch["attention_mask"])  # [B, T, V]
        total += float(sft_loss(logits, batch["input_ids"], batch["loss_mask"])) * n
        count += n
    return total / count if count else float("nan")


def total_steps(n_train: int, cfg: SFTConfig) -> int:
    per_epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))


def micro_batches(n: int, cfg: SFTConfig):
    """Endless stream of (epoch, index list) micro-batches: a fresh seeded shuffle each epoch."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, n, cfg.batch_size):
            yield epoch, order[i: i + cfg.batch_size], i + cfg.batch_size >= n
        epoch += 1


def train_sft(model, train: list[Example], heldout: list[Example], cfg: SFTConfig, pad_id: int,
              log: Callable[[dict], None] | None = None, amp_dtype: torch.dtype | None = None,
              progress: bool = True) -> dict:
    """Fine-tune `model` in place on `train`; returns a summary (steps, last loss, held-out losses).

    log(record) receives one dict per optimizer step ({"phase": "sft", step, epoch (0-based, of the step's last
    micro-batch), loss, lr, grad_norm, tokens (non-pad), target_tokens, tokens_per_s, seconds}) and one per held-out
    evaluation ({"phase": "sft_eval", step, epoch (epochs completed), heldout_loss}): before the first step, after
    each epoch, and after the last step.

    Mixed precision (precision.py): the model's weights are float32 (or float64); amp_dtype (bf16/fp16, None: off)
    is the dtype of the forward and backward passes under autocast.

    Under torchrun (distributed.py) every process draws the same micro-batches and takes its rows r, r + W, ... of
    each; the loss is the token mean over the whole step's tokens in every process (gradients summed), so W
    processes make the update one process makes. The held-out loss is computed in every process."""
    precision.check_trainable(model, "the SFT model")
    if not train:
        raise MinicaiError("no SFT training examples (all revisions empty or longer than --max-len). "
                           "Fix: generate more revisions or raise --max-len.")
    log = log or (lambda rec: None)
    progress = progress and distributed.is_main()  # under torchrun: rank 0 shows the bar and prints
    steps = total_steps(len(train), cfg)
    warm = warmup_steps(cfg.warmup, steps)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # no weight decay on norms and biases
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    heldout_losses = []
    scaler = precision.grad_scaler(model.device, amp_dtype)  # fp16 only: loss scaling

    def eval_heldout(step: int, epoch: int):
        if heldout:
            model.eval()
            loss = evaluate_loss(model, heldout, pad_id, cfg.eval_batch_size, amp_dtype)
            heldout_losses.append(loss)
            log({"phase": "sft_eval", "step": step, "epoch": epoch, "heldout_loss": loss})
            if progress:
                tqdm.write(f"step {step} epoch {epoch}: held-out loss {loss:.4f}")

    eval_heldout(0, 0)
    stream = micro_batches(len(train), cfg)
    bar = tqdm(total=steps, desc="sft", unit="step", dynamic_ncols=True, disable=not progress)
    loss_value = float("nan")
    for step in range(steps):
        model.train()
        t0 = time.perf_counter()
        lr = lr_at(step, steps, cfg.lr, warm, cfg.schedule, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        # Token-weighted accumulation: each micro-batch's mean loss is scaled by its share of the step's tokens.
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        shares = [[idx[i] for i in distributed.my_rows(len(idx))] for _, idx, _ in micro]  # this process's rows
        batches = [{k: v.to(model.device) for k, v in collate([train[i] for i in idx], pad_id).items()}
                   for idx in shares if idx]
        n_target = int(distributed.total(sum(target_tokens(b) for b in batches)))  # the whole step's, all processes
        loss_sum = 0.0
        for b in batches:
            n = target_tokens(b)
            if n == 0:
                continue
            with precision.autocast(model.device, amp_dtype):
                logits = model(b["input_ids"], b["attention_mask"])  # [B, T, V]
            loss = sft_loss(logits, b["input_ids"], b["loss_mask"])
            scaler.scale(loss * (n / n_target)).backward()
            loss_sum += float(loss.detach()) * n
        distributed.all_reduce_grads([p for p in model.parameters() if p.requires_grad])
        loss_sum = distributed.total(loss_sum)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        check_finite("sft", step + 1, loss=loss_sum,  # NaN/inf: stop before the update (fp16: the scaler's job)
                     grad_norm=None if scaler.is_enabled() else grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = int(distributed.total(sum(int(b["attention_mask"].sum()) for b in batches)))
        loss_value = loss_sum / max(1, n_target)
        ended = [m[0] for m in micro if m[2]]  # an epoch ended inside this step
        epoch = micro[-1][0]
        log({"phase": "sft", "step": step + 1, "epoch": epoch, "loss": loss_value, "lr": lr,
             "grad_norm": float(grad_norm), "tokens": tokens, "target_tokens": n_target,
             "tokens_per_s": tokens / dt, "seconds": dt})
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        bar.update(1)
        if ended or step == steps - 1:  # held-out loss after each epoch and at the end
            eval_heldout(step + 1, ended[-1] + 1 if ended else epoch)
    bar.close()
    model.eval()
    return {"steps": steps, "train_examples": len(train), "heldout_examples": len(heldout),
            "last_loss": loss_value, "heldout_losses": heldout_losses}
