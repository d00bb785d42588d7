"""Batched sampling with a KV cache: the one way every stage draws text from a model.

`generate` runs the prompts' shared opening through the model once, then their left-padded remainders (prefill),
then decodes one token per step from the preallocated cache. It returns the new tokens, a mask of which are real,
and the log-probability of each sampled token under the distribution it was drawn from (PPO's "old" log-probs,
paper section 4 / Schulman 2017).
Same seed, same prompts, same model -> the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicai.losses import temper
from minicai.model import shared_prefix_length


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] long: new tokens only; pad_id after a row has stopped
    mask: torch.Tensor  # [B, N] long: 1 on real generated tokens (the stop token included), 0 after
    logprobs: torch.Tensor  # [B, N] float32: log-prob of each sampled token under the sampling distribution
    finished: torch.Tensor  # [B] bool: True if the row ended on a stop id, False if it hit max_new_tokens


def pad_rows(rows: list[list[int]], pad_id: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T], mask [B, T]) long, T the longest row; mask 1 on real tokens.

    side "left": every row ends at the last column (prompts, so decoding appends to all rows at once);
    side "right": every row starts at column 0 (responses, training sequences, answer options).
    The one padder of the project: positions and attention follow the mask, so padding never changes a row."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_rows: side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution's logits [B, V]: divided by the temperature, then top-k and nucleus (top-p) cuts
    (removed tokens get -inf). temperature 0 means greedy and leaves the logits untempered."""
    logits = logits.float()
    if temperature > 0:
        logits = temper(logits, temperature)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from probs [B, V] -> ids [B], by inverting the cumulative distribution at a uniform number.

    Exact up to the float64 rounding of the running sum, and a token of probability 0 is never drawn. One uniform
    per row; on the CPU much faster than torch.multinomial at a 49k vocabulary (BENCHMARKS.md)."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # the first index whose cumulative mass exceeds u; a zero-probability token repeats its left neighbour's value
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _nucleus(logits: torch.Tensor, top_p: float, shortlist: int = 512) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; the rest get -inf.

    Exact, but fast: the nucleus almost always lies within the top few hundred tokens, so rank only those
    (a full sort of a 49k vocabulary per step costs more than the model at small batch); fall back to the full
    sort for rows whose shortlist does not reach top_p."""
    k = min(shortlist, logits.shape[-1])
    top_logits, order = torch.topk(logits, k, dim=-1)  # sorted, descending
    probs = top_logits.softmax(-1) * (top_logits.logsumexp(-1, keepdim=True) - logits.logsumexp(-1, keepdim=True)).exp()
    if k < logits.shape[-1] and bool((probs.sum(-1) < top_p).any()):
        order = torch.sort(logits, dim=-1, descending=True).indices
        probs = logits.gather(-1, order).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above this one
    keep_sorted = mass_before < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids=(),
    pad_id: int = 0,
    seed: int | None = None,
    share_prefix: bool = True,
) -> Generation:
    """Sample up to max_new_tokens for each prompt (token id lists). Greedy when temperature == 0.

    A row stops after emitting any id in stop_ids (that token is kept, mask 1); the loop ends when all rows stopped.
    log-probs are those of the (tempered, filtered) distribution each token was drawn from; for greedy decoding
    they are the plain log-softmax of the logits.

    share_prefix: the tokens every prompt starts with (chat template, system message, few-shot examples) go
    through the model once, not once per row (Transformer.encode_prefix); the rows are left-padded after it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs a non-empty list of non-empty prompts")
    device = model.device
    L = shared_prefix_length(prompts) if share_prefix else 0
    ids, mask = pad_rows([p[L:] for p in prompts], pad_id, "left", device)  # [B, P]: each prompt after the prefix
    B, P = ids.shape
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    # inference_mode: like no_grad, and it also skips autograd's bookkeeping on every tensor (version counters,
    # view tracking), which is a measurable part of a decoding step's many small operations
    with torch.inference_mode(), model.decoding(B):  # a no-op in model.py; packed weights in fast.py
        cache = model.new_cache(B, L + P + max_new_tokens)
        if L:
            cache.copy_prefix(model.encode_prefix(prompts[0][:L]))
        hidden = model.hidden_states(ids, mask, cache=cache)[:, -1]  # prefill; only the last position is needed
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        out_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)

        for t in range(max_new_tokens):
            logits = filter_logits(model.logits(hidden), temperature, top_k, top_p)  # [B, V] float32
            logp = logits.log_softmax(-1)
            if temperature == 0:
                next_tok = logits.argmax(-1)
            else:
                next_tok = sample_categorical(logits.softmax(-1), generator)
            tokens[:, t] = torch.where(alive, next_tok, pad_id)
            logprobs[:, t] = torch.where(alive, logp.gather(-1, next_tok[:, None]).squeeze(-1), 0.0)
            out_mask[:, t] = alive.long()
            if len(stop):
                hit = alive & torch.isin(next_tok, stop)
                finished |= hit
                alive &= ~hit
            if not alive.any() or t == max_new_tokens - 1:
                break
            hidden = model.hidden_states(tokens[:, t : t + 1], alive[:, None].long(), cache=cache)[:, -1]

    n = int(out_mask.sum(1).max().item()) if out_mask.any() else 0
    # copies made outside inference mode: ordinary tensors that callers may modify or use under autograd
    return Generation(tokens[:, :n].clone(), out_mask[:, :n].clone(), logprobs[:, :n].clone(), finished.clone())


def response_ids(gen: Generation, i: int, stop_ids=()) -> list[int]:
    """Row i's generated token ids, without padding and without a final stop token."""
    ids = gen.tokens[i][gen.mask[i].bool()].tolist()
    if ids and gen.finished[i] and (not stop_ids or ids[-1] in set(stop_ids)):
        ids = ids[:-1]
    return ids
