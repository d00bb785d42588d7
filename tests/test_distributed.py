"""Data parallelism (minicai/distributed.py): 2 processes with gloo on the CPU give what 1 process gives on the same
global batch. Every statistic is global: whitened advantages equal the single-process ones, and a PPO or GRPO update
(losses normalised over the global minibatch, gradients summed) leaves the same weights, to float64 rounding. GRPO
splits the batch in whole groups, so its group advantages need nothing from the other process."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minicai import distributed, grpo, ppo
from minicai.losses import whiten
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
        values=None if ro.values is None else ro.values[idx], scores=ro.scores[idx])


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


# GRPO: 3 prompts x G = 2 responses, rows 0-5. Rank 0 takes the groups of prompts 0 and 2 (rows 0, 1, 4, 5), rank 1
# prompt 1's (rows 2, 3). With minibatches of 4 rows, the first global minibatch {0, 1, 2, 3} is split 2 + 2 and the
# second {4, 5} has no row in rank 1 (it adds zero gradients); the second epoch shuffles rows across groups.
G = 2
GROUP_PROMPTS = PROMPTS[:3]
GROUP_SETTINGS = {  # loss aggregation, micro-batches, where the KL goes: each normaliser and split is global
    "token_mean": dict(loss_agg="token-mean", micro_batch_size=None, kl_in="reward"),
    "seq_mean_micro1": dict(loss_agg="seq-mean-token-mean", micro_batch_size=1, kl_in="loss"),
    "dr_grpo": dict(loss_agg="seq-mean-token-sum-norm", micro_batch_size=3, kl_in="reward"),
}


def group_config(**settings) -> ppo.PPOConfig:
    base = dict(batch_size=len(GROUP_PROMPTS) * G, minibatch_size=4, max_new_tokens=10, policy_lr=1e-3,
                advantage="grpo", group_size=G)
    return ppo.PPOConfig(**{**base, **settings})


def grpo_update_case() -> dict:
    """One GRPO update per GROUP_SETTINGS entry on a fixed global rollout of float64 models (a reference unlike the
    policy: KL != 0), this process's whole groups only."""
    results = {}
    for name, settings in GROUP_SETTINGS.items():
        policy = random_model(tiny_config(), seed=0, dtype=torch.float64)
        ref = random_model(tiny_config(), seed=1, dtype=torch.float64)
        cfg = group_config(**settings)
        reward = lambda prompts, responses: torch.tensor([len(r) + 0.1 * sum(t < 64 for t in r)  # noqa: E731
                                                          for r in responses], dtype=torch.float64)
        ro = grpo.group_rollout(policy, ref, GROUP_PROMPTS, [str(p) for p in GROUP_PROMPTS], reward, cfg,
                                stop_ids=STOP, seed=16)
        rows = [p * G + k for p in distributed.my_rows(len(GROUP_PROMPTS)) for k in range(G)]
        ro = grpo.compute_group_advantages(take_rows(ro, rows), beta=0.1, cfg=cfg)
        state = ppo.init_state(policy, ref, None, cfg)
        stats = grpo.grpo_step(policy, state.policy_opt, ro, cfg, seed=3)
        results[name] = {"rows": rows, "advantages": ro.advantages, "policy": policy.state_dict(), "stats": stats}
    return results


def grpo_iteration_case() -> dict:
    """One whole group_iteration (rollout, advantages, update) on the global batch of 3 prompts: each process samples
    its own groups. Micro-batches of 1 row; rank 1 holds no row of the first minibatch (no first forward pass)."""
    policy = random_model(tiny_config(), seed=0, dtype=torch.float64)
    cfg = group_config(micro_batch_size=1, minibatch_size=2)
    state = ppo.init_state(policy, copy.deepcopy(policy), None, cfg)
    reward = lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])  # noqa: E731
    ro, stats = grpo.group_iteration(state, GROUP_PROMPTS, [str(p) for p in GROUP_PROMPTS], reward, cfg,
                                     stop_ids=STOP, seed=5)
    return {"prompts": ro.prompts, "policy": policy.state_dict(), "stats": stats}


def sft_case() -> dict:
    """Two SFT steps of 2 micro-batches of 3 examples (token counts differ per example and per process)."""
    from minicai.sft import Example, SFTConfig, train_sft

    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (5, 9, 4, 12, 7, 6, 8, 10, 3, 11, 6, 9):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        examples.append(Example(ids, [0] * (n // 3) + [1] * (n - n // 3), "x"))
    model = random_model(tiny_config(), seed=2, dtype=torch.float64)
    logged = []
    train_sft(model, examples, [], SFTConfig(steps=2, lr=1e-3, warmup=0, batch_size=3, grad_accum=2, seed=0), 0,
              log=logged.append, progress=False)
    return {"weights": model.state_dict(), "losses": [r["loss"] for r in logged if r["phase"] == "sft"]}


def pm_case(tokenizer_dir: str) -> dict:
    """Two preference-model steps of 5 pairs each (3 + 2 per process)."""
    from minicai.reward import PMTrainConfig, train_preference_model
    from minicai.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_dir(tokenizer_dir)
    words = ["fox", "dog", "bread", "salt", "quick", "lazy"]
    records = [{"prompt": f"tell me about {words[i % 6]}", "response_a": " ".join(words[: 1 + i % 5]),
                "response_b": words[(i + 2) % 6] + " !!", "p_a": (0.9, 0.2, 0.5, 0.7)[i % 4]} for i in range(10)]
    rm = RewardModel.from_lm(random_model(tiny_config(vocab_size=tok.vocab_size), seed=3, dtype=torch.float64),
                             head_init="normal", seed=3).double()
    history = train_preference_model(rm, tok, records, PMTrainConfig(epochs=1, batch_size=5, lr=1e-3, seed=0))
    return {"weights": rm.state_dict(), "losses": [h["loss"] for h in history],
            "accuracy": [h["accuracy"] for h in history]}


CASES = {"ppo_update": ppo_update_case, "grpo_update": grpo_update_case, "grpo_iteration": grpo_iteration_case,
         "sft": sft_case, "pm": pm_case}


def run_case(case: str, tokenizer_dir: str) -> dict:
    return CASES[case](tokenizer_dir) if case == "pm" else CASES[case]()


def _worker(rank: int, world: int, init_file: str, out_dir: str, tokenizer_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({case: run_case(case, tokenizer_dir) for case in CASES}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    """Every case in this process (one process, all rows) and in 2 gloo processes: {case: (single, [rank0, rank1])}."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(tmp), str(tiny_tokenizer_dir)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {case: (run_case(case, str(tiny_tokenizer_dir)), [p[case] for p in parts]) for case in CASES}


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.allclose(b[k], v, atol=1e-10, rtol=0), (what, k, float((b[k] - v).abs().max()))


@pytest.mark.parametrize("case", ["sft", "pm"])
def test_sft_and_pm_updates_give_the_single_process_weights(case, results):
    single, parts = results[case]
    for p in parts:
        assert_same_weights(single["weights"], p["weights"], case)
        assert p["losses"] == pytest.approx(single["losses"], abs=1e-12)  # global metrics, the same everywhere
        if case == "pm":
            assert p["accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)


@pytest.fixture(scope="module")
def ppo_results(results):
    return results["ppo_update"]


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
    local = [whiten(single["advantages"][p["rows"]], single["advantages"][p["rows"]] != 0) for p in parts]
    assert not all(torch.allclose(a, single["advantages"][p["rows"]], atol=1e-3) for a, p in zip(local, parts))


def test_ppo_update_gives_the_single_process_weights(ppo_results):
    single, parts = ppo_results
    for p in parts:
        for net in ("policy", "value"):
            for k, v in single[net].items():
                assert torch.allclose(p[net][k], v, atol=1e-10, rtol=0), (net, k)
    initial = random_model(tiny_config(), seed=0, dtype=torch.float64).state_dict()
    assert not torch.allclose(single["policy"]["lm_head.weight"], initial["lm_head.weight"])  # it trained
    for key, value in single["stats"].items():  # metrics are global: the same in every process, the single one's
        if key != "ratio_first_maxdev":  # (each process measures its own rows of the first minibatch)
            assert parts[0]["stats"][key] == parts[1]["stats"][key], key
            tol = 1e-6 * abs(value) if key == "entropy" else 1e-10  # entropy: float32 logits (losses)
            assert parts[0]["stats"][key] == pytest.approx(value, abs=tol), key


# ---------------------------------------------------------------------------------------------------------------------
# DPO (train_dpo.py): each process takes its pairs of every micro-batch; the loss is each micro-batch's mean over
# its GLOBAL pair count, and every statistic is computed from the pairs of all processes


def dpo_case() -> dict:
    """Two DPO steps of 2 micro-batches through train_dpo.train_dpo, 10 training pairs of different lengths in
    micro-batches of 3, 3 | 3, 1 (split 2 + 1 and 1 + 0 over 2 processes), and the held-out metrics of 3 pairs."""
    import tempfile
    from types import SimpleNamespace

    import train_dpo as T

    g = torch.Generator().manual_seed(4)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=g).tolist()

    pairs = [T.Pair(i, ids(3 + i % 4), ids(2 + i % 3), ids(5 - i % 4), (0.9, 0.2, 0.5, 0.7, 1.0)[i % 5])
             for i in range(13)]
    policy = random_model(tiny_config(), seed=5, dtype=torch.float64)
    ref = copy.deepcopy(policy)
    cfg = T.DPOConfig(beta=0.5, steps=2, lr=1e-3, warmup=0, batch_size=3, grad_accum=2, eval_batch_size=2)
    with tempfile.TemporaryDirectory() as out:
        summary = T.train_dpo(policy, ref, SimpleNamespace(pad_id=0), pairs[:10], pairs[10:], cfg, Path(out),
                              save_every=100, progress=False)
    return {"weights": policy.state_dict(), "summary": summary}


CASES["dpo"] = dpo_case


def test_dpo_steps_give_the_single_process_weights_and_global_metrics(results):
    single, parts = results["dpo"]
    for p in parts:
        assert_same_weights(single["weights"], p["weights"], "dpo")
        assert p["summary"]["last_loss"] == pytest.approx(single["summary"]["last_loss"], abs=1e-12)
        assert p["summary"]["last_accuracy"] == pytest.approx(single["summary"]["last_accuracy"], abs=1e-12)
        for when in ("before", "after"):  # held-out: each process scored its pairs, the metrics are of all 3
            assert p["summary"]["held_out"][when] == pytest.approx(single["summary"]["held_out"][when], abs=1e-12)
    assert single["summary"]["held_out"]["after"]["n"] == 3
    initial = random_model(tiny_config(), seed=5, dtype=torch.float64).state_dict()
    assert not torch.allclose(single["weights"]["lm_head.weight"], initial["lm_head.weight"])  # it trained


# ---------------------------------------------------------------------------------------------------------------------
# GRPO / RLOO under torchrun: whole groups per process


@pytest.mark.parametrize("name", list(GROUP_SETTINGS))
def test_grpo_update_gives_the_single_process_weights(name, results):
    single, parts = results["grpo_update"]
    single, parts = single[name], [p[name] for p in parts]
    assert [p["rows"] for p in parts] == [[0, 1, 4, 5], [2, 3]]
    for p in parts:  # group advantages computed where the groups are: the single-process ones
        assert torch.allclose(p["advantages"], single["advantages"][p["rows"]], atol=1e-12, rtol=0)
        assert_same_weights(single["policy"], p["policy"], name)
        for key, value in single["stats"].items():  # the statistics are global: the single-process ones
            if key != "ratio_first_maxdev":  # (each process measures its own first micro-batch)
                tol = 1e-6 * abs(value) if key == "entropy" else 1e-10  # entropy: float32 logits (losses)
                assert p["stats"][key] == pytest.approx(value, abs=tol), (name, key)
    initial = random_model(tiny_config(), seed=0, dtype=torch.float64).state_dict()
    assert not torch.allclose(single["policy"]["lm_head.weight"], initial["lm_head.weight"])  # it trained


def test_grpo_iteration_takes_whole_groups_per_process(results):
    _, parts = results["grpo_iteration"]
    names = [str(p) for p in GROUP_PROMPTS]
    assert [p["prompts"] for p in parts] == [[names[0]] * G + [names[2]] * G, [names[1]] * G]
    for p in parts:
        assert p["stats"]["ratio_first_maxdev"] == 0.0 and p["stats"]["kl_max_abs"] == 0.0
        same = [k for k in p["stats"] if k not in ("rollout_s", "update_s")]  # global: the same in both processes
        assert {k: p["stats"][k] for k in same} == {k: parts[0]["stats"][k] for k in same}
    assert_same_weights(parts[0]["policy"], parts[1]["policy"], "grpo_iteration")  # one update, summed gradients


def test_pipeline_runs_every_training_stage_under_torchrun(tmp_path, tiny_model_dir):
    import pipeline

    log = pipeline.main(["--tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--dry-run",
                         "--nproc-per-node", "2", "--rl-methods", "ppo,dpo,grpo,rloo", "--stages", "rl"])
    commands = {s["stage"]: s["command"] for s in log["stages"]}
    torchrun = "torch.distributed.run --standalone --nproc_per_node 2"
    assert [stage for stage, command in commands.items() if torchrun in command] == ["rl", "dpo", "grpo", "rloo"]
