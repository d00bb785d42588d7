"""Data parallelism (minicai/distributed.py): 2 processes with gloo on the CPU give what 1 process gives on the same
global batch. Every statistic is global: whitened advantages equal the single-process ones, and a PPO update (token
means over the global minibatch, gradients summed) leaves the same weights, to float64 rounding."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minicai import distributed, ppo
from minicai.model import random_model, tiny_config
from minicai.reward import RewardModel

WORLD = 2
# 7 rows of different prompt lengths: rank 0 gets rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5 (an uneven split); with
# minibatches of 3, the second global minibatch {3, 4, 5} is split 1 + 2.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20, 21, 22], [23, 24],
           [25, 26, 27, 28, 29, 30, 31], [32, 33, 34, 35]]
STOP = list(range(100, 108))


def take_rows(ro: ppo.Rollout, rows: list[int]) -> ppo.Rollout:
    """The rollout's rows `rows` (the share of one process), before compute_advantages."""
    idx = torch.tensor(rows, dtype=torch.long)
    return ppo.Rollout(
        prompts=[ro.prompts[i] for i in rows], prefix_ids=ro.prefix_ids, query_ids=ro.query_ids[idx],
        query_mask=ro.query_mask[idx], response_ids=ro.response_ids[idx], response_mask=ro.response_mask[idx],
        finished=ro.finished[idx], responses=[ro.responses[i] for i in rows],
        sample_logprobs=ro.sample_logprobs[idx], logprobs=ro.logprobs[idx], ref_logprobs=ro.ref_logprobs[idx],
        values=ro.values[idx], scores=ro.scores[idx])


def ppo_update_case() -> dict:
    """One PPO update (2 epochs, minibatches of 3) on a fixed global rollout, this process's rows only."""
    policy = random_model(tiny_config(), seed=0, dtype=torch.float64)
    ref = copy.deepcopy(policy)
    value = RewardModel.from_lm(copy.deepcopy(policy), head_init="normal", seed=0).double()
    cfg = ppo.PPOConfig(batch_size=len(PROMPTS), minibatch_size=3, max_new_tokens=10, policy_lr=1e-3, value_lr=1e-3)
    # the same global rollout in every process (same weights, same seed); each keeps its rows
    scores = lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])  # noqa: E731
    ro = ppo.rollout(policy, ref, value, PROMPTS, [str(p) for p in PROMPTS], scores, cfg, stop_ids=STOP, seed=16)
    rows = distributed.my_rows(len(PROMPTS))
    ro = ppo.compute_advantages(take_rows(ro, rows), beta=0.1, cfg=cfg)
    state = ppo.init_state(policy, ref, value, cfg)
    stats = ppo.ppo_step(policy, value, state.policy_opt, state.value_opt, ro, cfg, seed=3)
    return {"rows": rows, "advantages": ro.advantages, "policy": policy.state_dict(), "value": value.state_dict(),
            "stats": stats}


CASES = {"ppo_update": ppo_update_case}


def _worker(rank: int, world: int, init_file: str, out_dir: str, case: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(CASES[case](), Path(out_dir) / f"{case}_{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_in_processes(case: str, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path), case), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{case}_{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ppo_results(tmp_path_factory):
    single = ppo_update_case()  # no process group here: one process, all rows
    return single, run_in_processes("ppo_update", tmp_path_factory.mktemp("dist"))


def test_one_process_is_a_world_of_one():
    assert not distributed.active() and distributed.world() == 1 and distributed.rank() == 0
    assert distributed.is_main() and distributed.my_rows(3) == [0, 1, 2]
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"


def test_rows_are_split_by_rank(ppo_results):
    _, parts = ppo_results
    assert [p["rows"] for p in parts] == [[0, 2, 4, 6], [1, 3, 5]]


def test_whitened_advantages_equal_the_single_process_ones(ppo_results):
    single, parts = ppo_results
    for p in parts:
        assert torch.allclose(p["advantages"], single["advantages"][p["rows"]], atol=1e-12, rtol=0)
    # per-process whitening (the bug this guards against) would differ
    local = [ppo.whiten(single["advantages"][p["rows"]], single["advantages"][p["rows"]] != 0) for p in parts]
    assert not all(torch.allclose(a, single["advantages"][p["rows"]], atol=1e-3) for a, p in zip(local, parts))


def test_ppo_update_gives_the_single_process_weights(ppo_results):
    single, parts = ppo_results
    for p in parts:
        for net in ("policy", "value"):
            for k, v in single[net].items():
                assert torch.allclose(p[net][k], v, atol=1e-10, rtol=0), (net, k)
    initial = random_model(tiny_config(), seed=0, dtype=torch.float64).state_dict()
    assert not torch.allclose(single["policy"]["lm_head.weight"], initial["lm_head.weight"])  # it trained
    for key in ("policy_loss", "value_loss", "clipfrac"):
        assert parts[0]["stats"][key] == parts[1]["stats"][key]  # metrics are global: the same in every process
