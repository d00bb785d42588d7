"""Several processes (torchrun): data parallelism with torch.distributed, NCCL on GPUs and gloo on the CPU.

    torchrun --nproc_per_node 2 train_rl.py ...     # one process per GPU (or per group of CPU cores)

Every process holds the whole model and takes its share of each batch: rank r of W takes the rows r, r + W, r + 2W,
... of every global batch (`my_rows`; GRPO/RLOO take whole groups, the responses to one prompt, the same way:
`local_rows`). After each backward pass the gradients are summed over the processes (`all_reduce_grads`), so every
process applies the same update and the weights stay identical, as with DistributedDataParallel (which does the
same sum, averaged, overlapped with the backward pass; the training passes here call model.hidden_states/logits
rather than forward, which DDP's hooks would not see).

The rule that makes W processes equal one: every statistic is global, never per process. A token-mean loss is
divided by the GLOBAL token count, so each process scales its local mean by local count / global count
(`token_share`) and the gradients are summed, not averaged; the split of a batch over processes then changes
nothing. Advantage whitening uses the global mean and variance (`whiten`), the KL controller and the logged metrics
the global means (`mean`, `masked_mean`; `sum_stats` adds up each process's token shares). Per-process statistics
here are a known bug of public implementations (../shared/research/rlhf-conventions.md). Only rank 0 writes files
and shows progress bars (`is_main`).

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op on a world of 1.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from minicai.losses import masked_mean as local_masked_mean
from minicai.losses import whiten as local_whiten


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the process that writes files, prints and shows progress bars."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL for CUDA, gloo for the CPU. On CUDA each
    process takes the GPU of its LOCAL_RANK. Returns the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # rank 0 alone generates the SL and PM data while the others wait at a barrier: allow it hours, not minutes
    minutes = float(os.environ.get("MINICAI_DIST_TIMEOUT_MIN", "240"))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=minutes))
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def my_rows(n: int) -> list[int]:
    """This process's rows of a global batch of n: r, r + W, r + 2W, ..."""
    return list(range(rank(), n, world()))


def _reduce(t: Tensor, op) -> Tensor:
    """all_reduce of a copy of t; NCCL reduces GPU tensors only, so a CPU tensor travels through this process's GPU."""
    if not active():
        return t
    wire = t.to(torch.device("cuda", torch.cuda.current_device()), copy=True) if (
        dist.get_backend() == "nccl" and t.device.type != "cuda") else t.clone()
    dist.all_reduce(wire, op=op)
    return wire.to(t.device)


def all_sum(t: Tensor) -> Tensor:
    """The sum over processes (a new tensor; `t` itself when there is one process)."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_max(t: Tensor) -> Tensor:
    """The maximum over processes (a new tensor; `t` itself when there is one process)."""
    return _reduce(t, dist.ReduceOp.MAX)


def total(x: float | int, device=None) -> float:
    """A Python number summed over processes (float64 on the wire)."""
    return float(all_sum(torch.tensor(float(x), dtype=torch.float64, device=device)))


def local_rows(rows: Tensor, group: int = 1) -> Tensor:
    """This process's part of a global minibatch: `rows` index the global batch, the result this process's rows.

    The global batch is split in whole groups of `group` rows (1: rows; GRPO: the G responses to one prompt), group
    g to rank g % W, in order: rank r holds groups r, r + W, ... (my_rows over the groups). One process: `rows`."""
    if not active():
        return rows
    W, r = world(), rank()
    mine = [int(i) for i in rows if int(i) // group % W == r]
    return torch.tensor([i // group // W * group + i % group for i in mine], dtype=torch.long)


def token_share(mask: Tensor) -> float:
    """This process's part of a global minibatch's tokens (`mask`: its rows' response mask): local / global count,
    1 in one process. A token-mean loss times this share, its gradients summed over processes (all_reduce_grads),
    gives the gradient of the token mean over the global minibatch, whatever the split."""
    if not active():
        return 1.0
    local = float(mask.sum())
    everywhere = total(local)
    return local / everywhere if everywhere > 0 else 0.0


def sum_stats(stats: dict[str, float]) -> dict[str, float]:
    """Each statistic summed over processes, in one all-reduce (float64); one process: the numbers as they are.
    Summing every process's token share of a token mean (token_share) gives the global token mean."""
    if not active():
        return dict(stats)
    summed = all_sum(torch.tensor(list(stats.values()), dtype=torch.float64)).tolist()
    return dict(zip(stats, summed))


def largest(x: float) -> float:
    """The largest x of any process; a process without one passes nan (nan everywhere: nan)."""
    if not active():
        return x
    biggest = float(all_max(torch.tensor(-math.inf if math.isnan(x) else x, dtype=torch.float64)))
    return math.nan if biggest == -math.inf else biggest


# Logged statistics over every process's entries; in one process exactly the local expressions.


def mean(values: Tensor) -> float:
    """The mean of the entries of `values` [n_local] over all processes' entries."""
    if not active():
        return float(values.mean())
    s = torch.stack([values.double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                          device=values.device)])
    s = all_sum(s)
    return float(s[0] / s[1].clamp(min=1))


def std(values: Tensor) -> float:
    """The standard deviation (Bessel-corrected) of the entries of `values` over all processes' entries; 0 for one."""
    if not active():
        return float(values.std()) if values.numel() > 1 else 0.0
    mu, n = mean(values), total(values.numel())
    return (total(((values.double() - mu) ** 2).sum()) / (n - 1)) ** 0.5 if n > 1 else 0.0


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """losses.masked_mean over every process's masked entries."""
    if not active():
        return float(local_masked_mean(x, mask))
    m = mask.to(x.dtype)
    return total((x * m).sum()) / max(total(m.sum()), 1.0)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over processes, in one flat buffer (a missing gradient counts as zeros)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """losses.whiten over the union of every process's masked entries: global mean and (Bessel-corrected) variance.
    One process: losses.whiten itself."""
    if not active():
        return local_whiten(x, mask, eps=eps)
    m = mask.to(x.dtype)
    n = all_sum(m.sum().double())
    mu = all_sum((x * m).sum().double()) / n
    var = all_sum((((x.double() - mu) ** 2) * m.double()).sum()) / n * (n / (n - 1))
    out = (x - mu.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + eps)
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))
