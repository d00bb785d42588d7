"""DPO beside RL-CAI: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on the AI-labelled
pairs of Constitutional AI's stage 2 (Bai et al. 2022, section 4.1), without a preference model or sampling.

train_pm.py writes the comparison pairs (pairs.jsonl: two samples of the SL-CAI model per prompt) and the
feedback model's soft labels (labels.jsonl: p_a = P(A is better)). The paper trains a PM on them and then runs
PPO against it; DPO instead fits the policy to them directly. The policy and the frozen reference both start
from the SL-CAI model, and every step minimises the soft-label DPO loss (losses.dpo_loss)

    -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)],   h = log pi(A)/pi_ref(A) - log pi(B)/pi_ref(B),

over sequence log-probs of the responses (sums over their tokens, the end-of-turn token included unless the
sampler cut the response off). The held-out pairs are those train_pm.py held out for the PM (same --seed and
--eval-pairs), so DPO's held-out preference accuracy reads beside the PM's.

    python train_dpo.py                                   # runs/sl/model + runs/pm/{pairs,labels}.jsonl -> runs/dpo
    python train_dpo.py --labels hard --beta 0.1          # the usual hard-label DPO, for comparison
    torchrun --nproc_per_node 2 train_dpo.py ...          # data parallel: each process takes its share of the pairs

Outputs in --out (default runs/dpo): args.json, metrics.jsonl (one line per step, one per evaluation),
checkpoints/step_N/ (policy, optimiser state; a rerun resumes from the newest; removed once model/ is complete),
model/ (the final policy, HF layout, with done.json) and summary.json (held-out accuracy and reward margin before
and after training).
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from minicai import MinicaiError, distributed, precision, run
from minicai.data import atomic_write_json, iter_jsonl, publish_dir, read_jsonl, write_jsonl
from minicai.losses import dpo_implicit_rewards, dpo_loss, masked_sum, preference_accuracy, reward_margin
from minicai.model import shared_prefix_length
from minicai.ppo import clip_grad_norm, policy_logprobs
from minicai.presets import suggested_command
from minicai.sampling import pad_rows
from minicai.sft import lr_at, micro_batches, total_steps, warmup_steps

DEFAULT_POLICY = "runs/sl/model"
DEFAULT_DATA = "runs/pm"

GPU_EPILOG = f"""\
suggested GPU setting (one large GPU; the dpo stage of `python pipeline.py --preset gpu --rl-methods dpo`, after
train_pm.py's; minicai/presets.py):
{suggested_command("train_dpo.py", "dpo")}
  bf16 (the default on cuda): fp32 weights (and AdamW states) with the forward passes under bf16 autocast.
"""


@dataclass
class DPOConfig:
    """Hyperparameters of one DPO run (defaults: CPU-sized, see --help)."""

    beta: float = 0.1  # the implicit reward's scale (Rafailov et al.: 0.1 to 0.5)
    label_smoothing: float = 0.0  # conservative DPO's eps; 0 = the labels as they are
    labels: str = "soft"  # soft: the feedback model's p_a (the paper's PM targets); hard: p_a rounded to 0 or 1
    epochs: float = 1.0  # passes over the training pairs (ignored when steps is set)
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 5e-6
    warmup: float = 0.1  # a fraction of the steps if < 1, else a number of steps
    schedule: str = "cosine"  # cosine | linear | constant after warmup
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0  # max global gradient norm (0: no clipping)
    batch_size: int = 4  # pairs per micro-batch (2 rows each)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_len: int = 256  # tokens per conversation; a longer response loses its end
    eval_batch_size: int = 8  # pairs per no-grad evaluation batch
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.beta <= 0:
            problems.append(f"--beta {self.beta} (need > 0)")
        if not 0 <= self.label_smoothing <= 0.5:
            problems.append(f"--label-smoothing {self.label_smoothing} (need 0 <= eps <= 0.5)")
        if self.labels not in ("soft", "hard"):
            problems.append(f"--labels {self.labels!r} (use soft or hard)")
        if min(self.batch_size, self.grad_accum, self.max_len, self.eval_batch_size) < 1:
            problems.append("--batch-size, --grad-accum, --max-len and --eval-batch-size must be >= 1")
        if self.steps is not None and self.steps < 1 or self.epochs <= 0:
            problems.append("--steps must be >= 1 and --epochs > 0")
        if problems:
            raise MinicaiError("invalid DPO settings: " + "; ".join(problems) + ". Fix the flags.")


def parse_args(argv=None) -> argparse.Namespace:
    D = " (default: %(default)s)"
    p = argparse.ArgumentParser(description=__doc__, epilog=GPU_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_common_args(p, out_default="runs/dpo", model_default=DEFAULT_POLICY,  # the policy starts from SL-CAI
                        model_help="initial policy and frozen reference: the SL-CAI model (HF layout); 'default' "
                                   "for the base model" + D)
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="train_pm.py's run directory, holding pairs.jsonl and labels.jsonl" + D)
    p.add_argument("--force", action="store_true",
                   help="discard model/, checkpoints/, metrics.jsonl and summary.json in --out and train afresh")

    g = p.add_argument_group("DPO (Rafailov et al. 2023, eq. 7; losses.dpo_loss)")
    g.add_argument("--beta", type=float, default=DPOConfig.beta,
                   help="scale of the implicit reward beta * log(pi / pi_ref); smaller lets the policy move "
                        "further from the SL-CAI model" + D)
    g.add_argument("--labels", choices=("soft", "hard"), default=DPOConfig.labels,
                   help="soft: the feedback model's P(A is better), as the paper's PM learns them (paper-faithful); "
                        "hard: rounded to 0/1, pairs labelled exactly 0.5 skipped (the usual DPO)" + D)
    g.add_argument("--label-smoothing", type=float, default=DPOConfig.label_smoothing,
                   help="conservative DPO's eps: every label p becomes eps + (1 - 2 eps) p" + D)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=DPOConfig.epochs, help="passes over the training pairs" + D)
    g.add_argument("--steps", type=int, default=DPOConfig.steps, help="optimizer steps; overrides --epochs" + D)
    g.add_argument("--lr", type=float, default=DPOConfig.lr, help="peak AdamW learning rate" + D)
    g.add_argument("--warmup", type=float, default=DPOConfig.warmup,
                   help="linear warmup: a fraction of the steps if < 1, else a step count" + D)
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=DPOConfig.schedule,
                   help="decay after warmup" + D)
    g.add_argument("--min-lr-ratio", type=float, default=DPOConfig.min_lr_ratio,
                   help="final learning rate as a fraction of --lr" + D)
    g.add_argument("--weight-decay", type=float, default=DPOConfig.weight_decay, help="AdamW weight decay" + D)
    g.add_argument("--clip", type=float, default=DPOConfig.clip, help="gradient-norm clip, 0 = off" + D)
    g.add_argument("--batch-size", type=int, default=DPOConfig.batch_size,
                   help="pairs per micro-batch; each is 2 rows, A and B" + D)
    g.add_argument("--grad-accum", type=int, default=DPOConfig.grad_accum, help="micro-batches per step" + D)
    g.add_argument("--max-len", type=int, default=DPOConfig.max_len,
                   help="max tokens per conversation (prompt + response); longer responses lose their end" + D)

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-pairs", type=int, default=16,
                   help="labelled pairs held out; the same pairs as train_pm.py's with the same value and --seed" + D)
    g.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate on the held-out pairs every N steps (0: before and after training only)" + D)
    g.add_argument("--eval-batch-size", type=int, default=DPOConfig.eval_batch_size,
                   help="pairs per evaluation batch" + D)
    g.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every N steps (135M model: ~1.6 GB with the optimiser state; only the newest "
                        "is kept)" + D)
    args = p.parse_args(argv)
    if args.eval_pairs < 0 or args.eval_every < 0 or args.save_every < 1:
        p.error("--eval-pairs and --eval-every must be >= 0 and --save-every >= 1")
    return args


def dpo_config(args) -> DPOConfig:
    """DPOConfig from the flags (one flag per field, same name)."""
    return run.config_from_args(DPOConfig, args)


# ---------------------------------------------------------------------------------------------------------------------
# Data: train_pm.py's pairs and labels, as token ids


@dataclass
class Pair:
    """One labelled comparison in the policy's chat template."""

    id: int
    prompt: list[int]  # the user turn and the assistant header: everything before the response
    response_a: list[int]  # the assistant's tokens: content and end-of-turn token (none if the sampler cut it off)
    response_b: list[int]
    p_a: float  # the label: P(A is better)


def read_labelled_pairs(data_dir: Path) -> list[dict]:
    """The records of labels.jsonl, each checked against its pair in pairs.jsonl (same id, same prompt and
    responses): {id, prompt, response_a, response_b, finished, p_a}."""
    pairs_path, labels_path = data_dir / "pairs.jsonl", data_dir / "labels.jsonl"
    for path in (pairs_path, labels_path):
        if not path.is_file():
            raise MinicaiError(f"{path}: not found (fix: run train_pm.py first, at least --only pairs and --only "
                               f"label, or pass --data DIR)")
    pairs = {r["id"]: r for r in read_jsonl(pairs_path, tolerate_partial_last=True)}
    out = []
    for line, rec in iter_jsonl(labels_path, tolerate_partial_last=True):
        pair = pairs.get(rec.get("id"))
        where = f"{labels_path}:{line}"
        if pair is None:
            raise MinicaiError(f"{where}: id {rec.get('id')!r} is not in {pairs_path} (fix: relabel with "
                               f"python train_pm.py --only label --force --out {data_dir})")
        if any(rec.get(k) != pair[k] for k in ("prompt", "response_a", "response_b")):
            raise MinicaiError(f"{where}: pair {rec['id']} differs from {pairs_path} (the pairs were remade after "
                               f"labelling; fix: python train_pm.py --only label --force --out {data_dir})")
        p_a = rec.get("p_a")
        if not isinstance(p_a, (int, float)) or not 0.0 <= p_a <= 1.0:
            raise MinicaiError(f"{where}: p_a = {p_a!r}, want a probability in [0, 1] (fix: relabel the pairs)")
        finished = pair.get("finished", [True, True])
        out.append({"id": pair["id"], "prompt": pair["prompt"], "response_a": pair["response_a"],
                    "response_b": pair["response_b"], "finished": finished, "p_a": float(p_a)})
    if not out:
        raise MinicaiError(f"{labels_path}: no labels (fix: run python train_pm.py --only label --out {data_dir})")
    return out


def held_out_split(records: list[dict], eval_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """train_pm.py's split: sort by id, shuffle with the seed, hold out the last eval_pairs (at most all but one).
    The same seed and count hold out the same pairs as the PM, so the two held-out accuracies compare directly."""
    from train_pm import split

    return split(records, eval_pairs, seed)


def encode_response(tok, prompt: str, response: str, finished: bool, max_len: int):
    """(prompt ids, response ids) of [user: prompt, assistant: response] in the chat template, or None when no
    response token fits in max_len.

    The response ids are the tokens the assistant wrote (render_with_mask's 1s): its content and its end-of-turn
    token. A response the sampler cut off at its token limit (finished False) loses the end-of-turn token, as in
    sft.encode_example: its probability of stopping there is not what was compared. A conversation longer than
    max_len loses the end of its response."""
    ids, mask = tok.render_with_mask([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    start, end = mask.index(1), len(mask) - mask[::-1].index(1)  # the assistant's tokens: ids[start:end]
    end = min(end - (0 if finished else 1), max_len)
    return (ids[:start], ids[start:end]) if end > start else None


def encode_pairs(tok, records: list[dict], max_len: int) -> tuple[list[Pair], int]:
    """Pairs in token ids, and how many records were dropped (a response with no token within max_len)."""
    pairs = []
    for r in records:
        a = encode_response(tok, r["prompt"], r["response_a"], r["finished"][0], max_len)
        b = encode_response(tok, r["prompt"], r["response_b"], r["finished"][1], max_len)
        if a is not None and b is not None:
            pairs.append(Pair(r["id"], a[0], a[1], b[1], r["p_a"]))
    return pairs, len(records) - len(pairs)


def hard_labels(pairs: list[Pair]) -> list[Pair]:
    """p_a rounded to 1 (A better) or 0 (B better); pairs labelled exactly 0.5 carry no preference and are left out."""
    return [Pair(p.id, p.prompt, p.response_a, p.response_b, float(p.p_a > 0.5)) for p in pairs if p.p_a != 0.5]


@dataclass
class PairBatch:
    """B pairs as 2B rows, A rows first: prefix | pad.. prompt | response ..pad (the layout of minicai/ppo.py)."""

    prefix: Tensor  # [L] the opening all rows share (chat template, system message), computed once per pass
    ids: Tensor  # [2B, P + N] left-padded prompts after the prefix, then right-padded responses
    mask: Tensor  # [2B, P + N]
    prompt_width: int  # P
    response_mask: Tensor  # [2B, N] 1 on response tokens
    p_a: Tensor  # [B] float32 labels

    @property
    def tokens(self) -> int:
        return int(self.mask.sum()) + len(self.prefix)


def collate_pairs(pairs: list[Pair], pad_id: int, device) -> PairBatch:
    prompts = [p.prompt for p in pairs] * 2  # [2B]: rows i and B + i are the two responses to one prompt
    responses = [p.response_a for p in pairs] + [p.response_b for p in pairs]
    L = shared_prefix_length(prompts)
    query_ids, query_mask = pad_rows([q[L:] for q in prompts], pad_id, "left")  # [2B, P]
    resp_ids, resp_mask = pad_rows(responses, pad_id, "right")  # [2B, N]
    return PairBatch(
        prefix=torch.tensor(prompts[0][:L], dtype=torch.long, device=device),
        ids=torch.cat([query_ids, resp_ids], dim=1).to(device), mask=torch.cat([query_mask, resp_mask], 1).to(device),
        prompt_width=query_ids.shape[1], response_mask=resp_mask.to(device),
        p_a=torch.tensor([p.p_a for p in pairs], dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------------------------------------
# The DPO step
#
# Under torchrun (minicai/distributed.py) every process draws the same micro-batches of pairs and takes its pairs
# r, r + W, ... of each. Each process scales its micro-batch mean by its share of the micro-batch's pairs (local /
# global count) and the gradients are summed, so the update is that of one process on the whole batch. Every
# statistic (loss, accuracy, margin, log-ratios, the held-out metrics) is computed from the pairs of all processes
# (gather_pairs), with the same functions one process uses.

COLUMNS = ("logp_a", "logp_b", "ref_a", "ref_b", "p_a")  # per pair: its log-probs and its label; one row each


def gather_pairs(columns: Tensor, rows: list[int], n: int) -> Tensor:
    """The COLUMNS [5, n] of a global batch of n pairs, in every process, from this process's pairs `rows` of it
    (distributed.my_rows), columns [5, len(rows)]: each process fills its pairs of a zero tensor and the tensors are
    summed (x + 0 = x exactly). One process: `columns` itself."""
    if not distributed.active():
        return columns
    out = torch.zeros((len(COLUMNS), n), dtype=columns.dtype, device=columns.device)
    out[:, rows] = columns
    return distributed.all_sum(out)


def response_logprobs(model, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """Sequence log-probs log pi(y | x) of the A and B responses: sums over response tokens -> ([B], [B]) float32."""
    logp, _ = policy_logprobs(model, batch.ids, batch.mask, batch.prompt_width, 1.0, batch.prefix)  # [2B, N]
    seq = masked_sum(logp, batch.response_mask, dim=1)  # [2B]
    B = len(batch.p_a)
    return seq[:B], seq[B:]


def dpo_batch_loss(policy, ref_model, batch: PairBatch, cfg: DPOConfig,
                   amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The soft-label DPO loss of one batch (mean over its pairs) and its COLUMNS [5, B] (detached). amp_dtype:
    the forward passes under autocast in bf16/fp16 (minicai/precision.py), None: in the weights' dtype."""
    with torch.no_grad(), precision.autocast(policy.device, amp_dtype):
        ref_a, ref_b = response_logprobs(ref_model, batch)
    with precision.autocast(policy.device, amp_dtype):
        logp_a, logp_b = response_logprobs(policy, batch)
    loss = dpo_loss(logp_a, logp_b, ref_a, ref_b, batch.p_a, cfg.beta, cfg.label_smoothing)
    columns = torch.stack([logp_a.detach(), logp_b.detach(), ref_a, ref_b, batch.p_a.to(logp_a.dtype)])
    return loss, columns


@torch.no_grad()
def batch_stats(columns: Tensor, cfg: DPOConfig) -> dict:
    """The loss and statistics (floats) of a batch of pairs from its COLUMNS [5, B]."""
    logp_a, logp_b, ref_a, ref_b, p_a = columns  # [B] each
    r_a = dpo_implicit_rewards(logp_a, ref_a, cfg.beta)  # [B]
    r_b = dpo_implicit_rewards(logp_b, ref_b, cfg.beta)
    log_ratio = torch.cat([logp_a - ref_a, logp_b - ref_b])  # [2B] log pi(y)/pi_ref(y) per response
    return {"loss": float(dpo_loss(logp_a, logp_b, ref_a, ref_b, p_a, cfg.beta, cfg.label_smoothing)),
            "accuracy": preference_accuracy(r_a, r_b, p_a), "reward_margin": reward_margin(r_a, r_b, p_a),
            "reward_a": float(r_a.mean()), "reward_b": float(r_b.mean()),
            "log_ratio_mean": float(log_ratio.mean()), "log_ratio_max_abs": float(log_ratio.abs().max()),
            "logp_a": float(logp_a.mean()), "logp_b": float(logp_b.mean())}


@torch.no_grad()
def evaluate(policy, ref_model, pairs: list[Pair], cfg: DPOConfig, pad_id: int,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Held-out DPO metrics: the loss, preference accuracy of the implicit rewards against the labels (p_a > 0.5:
    A better; ties wrong; p_a == 0.5 left out), reward margin (mean r_better - r_worse) and the log-ratios to the
    reference. Before training the policy equals the reference: every pair ties, so accuracy and margin are 0.
    Under torchrun each process scores its pairs r, r + W, ... and the metrics are those of all pairs."""
    if not pairs:
        return {"n": 0}
    was_training = policy.training
    policy.eval()
    rows = distributed.my_rows(len(pairs))
    mine = [pairs[i] for i in rows]
    columns = {"logp_a": [], "logp_b": [], "ref_a": [], "ref_b": [], "p_a": []}
    for s in range(0, len(mine), cfg.eval_batch_size):
        batch = collate_pairs(mine[s : s + cfg.eval_batch_size], pad_id, policy.device)
        with precision.autocast(policy.device, amp_dtype):
            ref_a, ref_b = response_logprobs(ref_model, batch)
            logp_a, logp_b = response_logprobs(policy, batch)
        for name, x in zip(columns, (logp_a, logp_b, ref_a, ref_b, batch.p_a)):
            columns[name].append(x.double().cpu())
    policy.train(was_training)
    local = torch.stack([torch.cat(x) if x else torch.zeros(0, dtype=torch.float64) for x in columns.values()])
    logp_a, logp_b, ref_a, ref_b, p_a = gather_pairs(local, rows, len(pairs))  # [N] each, float64
    r_a, r_b = dpo_implicit_rewards(logp_a, ref_a, cfg.beta), dpo_implicit_rewards(logp_b, ref_b, cfg.beta)
    log_ratio = torch.cat([logp_a - ref_a, logp_b - ref_b])  # [2N]
    loss = dpo_loss(logp_a, logp_b, ref_a, ref_b, p_a, cfg.beta, cfg.label_smoothing)
    return {"n": len(pairs), "loss": float(loss), "accuracy": preference_accuracy(r_a, r_b, p_a),
            "reward_margin": reward_margin(r_a, r_b, p_a), "log_ratio_mean": float(log_ratio.mean()),
            "log_ratio_max_abs": float(log_ratio.abs().max())}


def make_optimizer(policy, cfg: DPOConfig) -> torch.optim.Optimizer:
    """AdamW over the policy (fused: one kernel per parameter group, as in minicai/ppo.py)."""
    return torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                             fused=True)


def dpo_step(policy, ref_model, opt, batches: list[PairBatch | None], cfg: DPOConfig,
             amp_dtype: torch.dtype | None = None, sizes: list[int] | None = None, scaler=None) -> dict:
    """One optimizer step: the loss of each micro-batch (mean over its pairs), averaged over them (equal weight per
    micro-batch), one gradient-norm clip and one AdamW step. Returns the micro-batches' mean statistics, grad_norm
    and tokens.

    Under torchrun, batches[i] holds this process's pairs distributed.my_rows(sizes[i]) of the i-th micro-batch of
    sizes[i] pairs, or None when it has none of them; one process: sizes default to the batches' own sizes.
    scaler: precision.grad_scaler's loss scaling (fp16; a no-op otherwise), kept across steps by the caller."""
    sizes = sizes or [len(b.p_a) for b in batches]
    scaler = scaler or precision.grad_scaler(policy.device, amp_dtype)
    sums = {}
    params = [p for p in policy.parameters() if p.requires_grad]
    for batch, n in zip(batches, sizes):
        rows = distributed.my_rows(n)
        if batch is not None:
            loss, columns = dpo_batch_loss(policy, ref_model, batch, cfg, amp_dtype)
            # this process's share of the micro-batch mean: its pairs / all pairs (1 in one process)
            scaler.scale(loss * (len(rows) / n) / len(batches)).backward()
        else:  # more processes than pairs: nothing to compute; zeros go into the sums of gather_pairs
            dtype = torch.float64 if policy.dtype == torch.float64 else torch.float32
            columns = torch.zeros((len(COLUMNS), 0), dtype=dtype, device=policy.device)
        for k, v in batch_stats(gather_pairs(columns, rows, n), cfg).items():
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    distributed.all_reduce_grads(params)
    scaler.unscale_(opt)
    grad_norm = clip_grad_norm(params, cfg.clip if cfg.clip > 0 else math.inf)
    scaler.step(opt)  # opt.step(), skipped by fp16 loss scaling when a gradient is inf/nan
    scaler.update()
    opt.zero_grad(set_to_none=True)
    tokens = distributed.total(sum(b.tokens for b in batches if b is not None))
    return {**sums, "grad_norm": float(grad_norm), "tokens": int(tokens)}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoints/step_000010/{policy/, trainer_state.pt}


def save_checkpoint(directory: Path, policy, tok, opt, step: int) -> Path:
    """Policy (HF layout + tokenizer), optimiser state and step counter, written to a temporary folder and renamed
    into place; older checkpoints are removed."""
    def write(tmp: Path) -> None:
        run.save_model(policy, tok, tmp / "policy")
        torch.save({"step": step, "optimizer": opt.state_dict()}, tmp / "trainer_state.pt")

    final = publish_dir(directory / f"step_{step:06d}", write)
    for old in directory.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    done = [p for p in directory.glob("step_*") if (p / "trainer_state.pt").is_file()] if directory.is_dir() else []
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def load_checkpoint(path: Path, policy, opt) -> int:
    """Restore policy weights and optimiser state in place; returns the step the checkpoint was taken after."""
    from minicai.model import Transformer

    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise MinicaiError(f"{path / 'trainer_state.pt'}: cannot be read ({e}). Fix: delete {path} and rerun "
                           "(training restarts), or pass --force") from None
    saved = Transformer.from_pretrained(path / "policy", dtype=policy.dtype, device=policy.device)
    with torch.no_grad():
        policy.load_state_dict(saved.state_dict())
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def keep_steps_up_to(file: Path, step: int) -> None:
    """On resume, drop the log lines of steps after the checkpoint (they will be redone)."""
    if file.exists():
        records = read_jsonl(file, tolerate_partial_last=True)
        write_jsonl(file, [r for r in records if r.get("step", 0) <= step])


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train_dpo(policy, ref_model, tok, train: list[Pair], held_out: list[Pair], cfg: DPOConfig, out: Path,
              amp_dtype: torch.dtype | None = None, save_every: int = 10, eval_every: int = 0,
              progress: bool = True) -> dict:
    """DPO on `train`, resuming from the newest checkpoint in out/checkpoints; returns the summary.

    Micro-batches come from sft.micro_batches (a fresh seeded shuffle per epoch), so a resumed run skips the ones
    already used and repeats exactly what an uninterrupted run does. Each optimizer step averages the loss over its
    micro-batches (equal weight per pair). Logs {"phase": "dpo", step, loss, accuracy, reward_margin, ...} per step
    and {"phase": "dpo_eval", step, ...} per held-out evaluation to out/metrics.jsonl.

    Mixed precision (minicai/precision.py): float32 policy weights and AdamW state, the forward and backward passes
    under autocast in amp_dtype (bf16/fp16; None: the weights' dtype), fp16 with loss scaling.

    Under torchrun every process draws the same micro-batches and trains on its pairs of each (dpo_step); rank 0
    alone writes the metrics and checkpoints, prints and shows the bar."""
    main = distributed.is_main()
    progress = progress and main
    if not train:
        raise MinicaiError("no DPO training pairs (all labelled 0.5 with --labels hard, or longer than --max-len); "
                           "fix: label more pairs or raise --max-len")
    ref_model.requires_grad_(False).eval()
    precision.check_trainable(policy, "the DPO policy")
    policy.requires_grad_(True).train()
    opt = make_optimizer(policy, cfg)
    scaler = precision.grad_scaler(policy.device, amp_dtype)
    steps = total_steps(len(train), cfg)
    warm = warmup_steps(cfg.warmup, steps)
    checkpoints = out / "checkpoints"
    start, evals = 0, {}
    last = latest_checkpoint(checkpoints)
    if last is not None:
        start = load_checkpoint(last, policy, opt)
        if main:
            keep_steps_up_to(out / "metrics.jsonl", start)
            print(f"resumed from {last} (step {start} of {steps})")

    def held_out_eval(step: int) -> None:
        if held_out:
            evals[step] = evaluate(policy, ref_model, held_out, cfg, tok.pad_id, amp_dtype)
            run.log_metrics(out, {"phase": "dpo_eval", "step": step, **evals[step]})
            if main:
                tqdm.write(f"step {step}: held-out accuracy {evals[step]['accuracy']:.3f}, reward margin "
                           f"{evals[step]['reward_margin']:.3g}, loss {evals[step]['loss']:.4f}")

    if start == 0:
        held_out_eval(0)
    stream = micro_batches(len(train), cfg)
    for _ in range(start * cfg.grad_accum):  # the micro-batches the checkpointed steps used
        next(stream)
    bar = tqdm(total=steps, initial=start, desc="DPO", unit="step", dynamic_ncols=True, disable=not progress)
    stats = {}
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, cfg.lr, warm, cfg.schedule, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        epoch = micro[-1][0]
        shares = [[idx[i] for i in distributed.my_rows(len(idx))] for _, idx, _ in micro]  # this process's pairs
        batches = [collate_pairs([train[i] for i in share], tok.pad_id, policy.device) if share else None
                   for share in shares]
        step_stats = dpo_step(policy, ref_model, opt, batches, cfg, amp_dtype, [len(idx) for _, idx, _ in micro],
                              scaler)
        dt = time.perf_counter() - t0
        stats = {"phase": "dpo", "step": step + 1, "epoch": epoch, **step_stats, "lr": lr,
                 "tokens_per_s": step_stats["tokens"] / dt, "seconds": dt}
        run.log_metrics(out, stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}",
                        margin=f"{stats['reward_margin']:.3f}")
        bar.update(1)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            held_out_eval(step + 1)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            if main:  # every process holds the same weights and optimiser state
                save_checkpoint(checkpoints, policy, tok, opt, step + 1)
            distributed.barrier()
    bar.close()
    held_out_eval(steps)
    policy.eval()
    summary = {"steps": steps, "train_pairs": len(train), "held_out_pairs": len(held_out),
               "last_loss": stats.get("loss"), "last_accuracy": stats.get("accuracy"),
               "held_out": {"before": evals.get(0), "after": evals.get(steps)}}
    if evals.get(0) is None and held_out and main:  # resumed: the evaluation before training is in metrics.jsonl
        before = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("phase") == "dpo_eval" and r["step"] == 0]
        summary["held_out"]["before"] = {k: v for k, v in before[-1].items() if k not in ("time", "phase", "step")} \
            if before else None
    return summary


def save_final(policy, tok, model_dir: Path, done: dict) -> None:
    """model/ in HF layout with done.json, complete or absent (data.publish_dir)."""
    def write(tmp: Path) -> None:
        run.save_model(policy, tok, tmp)
        atomic_write_json(tmp / "done.json", done)

    publish_dir(model_dir, write)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = run.setup(args)
    cfg = dpo_config(args)
    out = Path(args.out)
    if args.force and distributed.is_main():
        run.remove_outputs(out, ("model", "checkpoints", "metrics.jsonl", "summary.json", "cost.json"))
    distributed.barrier()
    if (out / "model" / "done.json").is_file():
        if distributed.is_main():
            print(f"{out / 'model'} is finished (done.json); nothing to do. Pass --force to train again.")
        return
    if args.model not in (None, "default") and not (Path(args.model) / "config.json").is_file():
        raise MinicaiError(f"--model {args.model}: no HF-layout model there. Fix: run train_sl.py first (it writes "
                           f"{DEFAULT_POLICY}), or pass --model DIR / --model default")
    records = read_labelled_pairs(Path(args.data))
    out = run.start_run(args, out)
    t0 = time.perf_counter()
    run_had_checkpoint = latest_checkpoint(out / "checkpoints") is not None  # resumed: cost.json adds up sessions

    # The SL-CAI model is the initial policy and, frozen, the reference.
    # Mixed precision (minicai/precision.py): float32 weights trained under bf16/fp16 autocast; the frozen reference
    # stores its blocks' linear weights in that dtype (what autocast casts them to: the same bits, no casts).
    amp_dtype = precision.amp_dtype(dtype)
    policy, tok, policy_dir = run.load_model_and_tokenizer(args.model, device, precision.weight_dtype(dtype),
                                                           fast=not args.no_fast)
    ref_model = precision.frozen_for_autocast(copy.deepcopy(policy), amp_dtype)
    train_records, held_records = held_out_split(records, args.eval_pairs, args.seed)
    train, dropped = encode_pairs(tok, train_records, cfg.max_len)
    held_out, dropped_eval = encode_pairs(tok, held_records, cfg.max_len)
    if cfg.labels == "hard":
        train, held_out = hard_labels(train), hard_labels(held_out)
    if distributed.is_main():
        print(f"policy and reference: {policy_dir}; {len(train)} training pairs, {len(held_out)} held out "
              f"({dropped + dropped_eval} dropped: no response token within --max-len {cfg.max_len}); "
              f"{cfg.labels} labels, beta {cfg.beta}")

    summary = train_dpo(policy, ref_model, tok, train, held_out, cfg, out, amp_dtype, save_every=args.save_every,
                        eval_every=args.eval_every)
    summary.update(data=str(args.data), policy=str(policy_dir), dropped=dropped + dropped_eval,
                   config=asdict(cfg), seconds=round(time.perf_counter() - t0, 1))
    if not distributed.is_main():  # every process holds the same weights: rank 0 writes them and the summary
        distributed.barrier()
        return
    save_final(policy, tok, out / "model", summary)
    atomic_write_json(out / "summary.json", summary)
    cost = run.write_cost(out, time.perf_counter() - t0, device, resumed=run_had_checkpoint)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # model/ is complete: nothing left to resume
    distributed.barrier()
    after = summary["held_out"]["after"]
    if after:
        print(f"held-out: accuracy {after['accuracy']:.3f} (ties wrong), reward margin {after['reward_margin']:.3g}, "
              f"mean log pi/pi_ref {after['log_ratio_mean']:.3f}")
    print(f"policy saved to {out / 'model'}; summary -> {out / 'summary.json'} ({summary['seconds']:.0f}s, peak RSS "
          f"{cost['peak_rss_mib']:.0f} MiB -> cost.json)")


if __name__ == "__main__":
    run.cli_main(main)
