"""Mixed precision (minicai/precision.py): with --dtype bf16, every stage trains float32 weights under bf16 autocast.

On the CPU, torch.autocast runs the code path that CUDA runs (bf16 matrix products and attention, float32 norms,
log-probs and losses), so these tests check on the CPU what a bf16 GPU run does: each stage script, run on a tiny
model with --dtype bf16, changes the weights wherever the same run in fp32 changes them (RMSNorm weights near 1.0
included, which bf16 storage cannot move by small steps), its loss falls about as in fp32 and really was computed in
bf16, and PPO still learns a programmatic reward, with ratio exactly 1 and KL exactly 0 before the first update.

MINICAI_TEST_DEVICE=cuda runs the PPO and stage-script tests on a GPU instead (bench/gpu_check.sh does)."""

import copy
import json
import os
from pathlib import Path

import pytest
from conftest import load_script
import torch

from minicai import ppo, precision
from minicai.model import Transformer, random_model, tiny_config
from minicai.reward import RewardModel

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("MINICAI_TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"




def test_adamw_steps_round_away_in_bf16_storage():
    """Why the rule exists: 5 AdamW steps at PPO's lr 3e-5 move every fp32 weight, but in bf16 storage most round
    away, and weights near 1.0 (RMSNorm) never move."""
    g = torch.Generator().manual_seed(0)
    init = {"linear": torch.randn(256, 256, generator=g) * 0.02, "norm": torch.ones(256)}
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init.values()]
        opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        changed[dtype] = [float((p.detach() != t.to(dtype)).float().mean()) for p, t in zip(params, init.values())]
    assert changed[torch.float32] == [1.0, 1.0]
    assert changed[torch.bfloat16][0] < 0.5 and changed[torch.bfloat16][1] == 0.0


def test_the_rule():
    assert precision.weight_dtype(torch.bfloat16) == precision.weight_dtype(torch.float16) == torch.float32
    assert precision.weight_dtype(torch.float64) == torch.float64 and precision.amp_dtype(torch.float32) is None
    assert precision.amp_dtype(torch.bfloat16) == torch.bfloat16
    model = random_model(tiny_config(), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="trainable bfloat16 parameters"):
        precision.check_trainable(model, "the policy")
    with pytest.raises(ValueError, match="the policy has trainable bfloat16"):
        ppo.init_state(model, copy.deepcopy(model), RewardModel.from_lm(random_model(tiny_config())), ppo.PPOConfig())
    model.requires_grad_(False)
    precision.check_trainable(model, "a frozen model")  # frozen networks may stay in bf16


def test_a_cpu_that_emulates_bf16_gets_a_note_and_a_gpu_or_fp32_does_not(monkeypatch):
    """On a CPU without bf16 matrix instructions (AVX2 only) --dtype bf16 is correct but several times slower than
    fp32: run.setup says so once, naming the fix; with the instructions, in fp32, or on a GPU it says nothing."""
    from minicai import fast, run

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(fast, "cpu_has_low_precision_products", lambda dtype: False)
    assert "--dtype fp32" in run.slow_dtype_note(cpu, torch.bfloat16)
    assert "no fp16 matrix instructions" in run.slow_dtype_note(cpu, torch.float16)
    assert run.slow_dtype_note(cpu, torch.float32) is None and run.slow_dtype_note(cuda, torch.bfloat16) is None
    monkeypatch.setattr(fast, "cpu_has_low_precision_products", lambda dtype: True)
    assert run.slow_dtype_note(cpu, torch.bfloat16) is None


def test_fp16_scales_the_loss_and_other_dtypes_do_not():
    """fp16's smallest normal number is 6e-5: gradients below it flush to 0 unless the loss is scaled up first."""
    assert precision.grad_scaler("cpu", torch.float16).is_enabled()
    for dtype in (torch.bfloat16, torch.float32, None):
        scaler = precision.grad_scaler("cpu", dtype)
        loss = torch.tensor(0.25)
        assert not scaler.is_enabled() and scaler.scale(loss) is loss
    w = torch.nn.Parameter(torch.ones(4))
    x = torch.full((4,), 1e-4)
    for enabled in (False, True):  # a gradient of 1e-4 * 1e-4 = 1e-8 per entry, computed in fp16
        w.grad = None
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        opt = torch.optim.SGD([w], lr=0.0)
        with precision.autocast("cpu", torch.float16):
            y = torch.nn.functional.linear(x[None], w[None])  # fp16 product
        scaler.scale(y.float().sum() * 1e-4).backward()
        scaler.unscale_(opt)
        assert (w.grad != 0).all() == enabled


def test_autocast_on_the_cpu_computes_in_bf16_and_keeps_weights_float32():
    model = random_model(tiny_config(), seed=0)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the flattened-rows path
    with torch.no_grad():
        fp32 = model(ids, mask)
        with precision.autocast("cpu", torch.bfloat16):
            bf16 = model(ids, mask)
        with precision.autocast("cpu", torch.float32):  # not a low dtype: no autocast
            same = model(ids, mask)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32 and torch.equal(same, fp32)
    m = mask.bool()
    assert 0 < float((bf16.float() - fp32)[m].abs().max()) < 0.05
    assert model.lm_head.weight.dtype == torch.float32


def test_reward_head_stays_float32_under_autocast():
    rm = RewardModel.from_lm(random_model(tiny_config(), seed=0), head_init="normal", seed=1)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), precision.autocast("cpu", torch.bfloat16):
        hidden = rm.trunk.hidden_states(ids, torch.ones_like(ids))
        scores = rm(ids, torch.ones_like(ids))
    assert scores.dtype == torch.float32
    assert torch.equal(scores, rm.head(hidden[:, -1].float()).squeeze(-1))  # no bf16 rounding of the head


@pytest.mark.parametrize("fast", [False, True], ids=["model.py", "fast.py"])
def test_a_frozen_model_with_low_precision_linear_weights_gives_the_same_bits(fast):
    """frozen_for_autocast stores the blocks' linear weights in bf16, what autocast casts them to at every pass: the
    logits and log-probs are those of the float32 model, bit for bit (the PPO reference's KL stays exactly 0)."""
    from minicai.fast import make_fast

    model = random_model(tiny_config(tie_word_embeddings=True), seed=0)
    model = make_fast(model) if fast else model
    frozen = precision.frozen_for_autocast(copy.deepcopy(model), torch.bfloat16)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad(), precision.autocast("cpu", torch.bfloat16):
        want = ppo.policy_logprobs(model, ids, mask, 5, 0.7, prefix_ids=ids[0, :2])
        got = ppo.policy_logprobs(frozen, ids, mask, 5, 0.7, prefix_ids=ids[0, :2])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    block = frozen.model["layers"][0]
    assert block.self_attn.q_proj.weight.dtype == block.mlp.down_proj.weight.dtype == torch.bfloat16
    assert frozen.dtype == block.input_layernorm.weight.dtype == torch.float32
    assert frozen.lm_head.weight is frozen.model["embed_tokens"].weight  # still tied, float32
    assert not any(p.requires_grad for p in frozen.parameters())
    fp32 = precision.frozen_for_autocast(copy.deepcopy(model), torch.float32)  # no autocast: nothing changes
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# PPO under bf16 autocast


def bf16_rollout(prompts):
    import test_ppo

    policy, ref, value = (m.to(DEVICE) for m in test_ppo.make_models())
    cfg = ppo.PPOConfig(batch_size=len(prompts), minibatch_size=3, max_new_tokens=10)
    state = ppo.init_state(policy, ref, value, cfg, amp_dtype=torch.bfloat16)
    ro, stats = ppo.ppo_iteration(state, prompts, [str(p) for p in prompts], test_ppo.count_reward(40), cfg,
                                  stop_ids=test_ppo.STOP, seed=16)
    return cfg, ro, stats


@pytest.mark.parametrize("shared", [False, True], ids=["no_shared_prefix", "shared_prefix"])
def test_ratio_one_and_kl_zero_before_the_first_update_under_autocast(shared):
    import test_ppo

    cfg, ro, stats = bf16_rollout(test_ppo.SHARED_PROMPTS if shared else test_ppo.PROMPTS)
    assert stats["ratio_first_maxdev"] == 0.0 and stats["kl_max_abs"] == 0.0 and stats["kl"] == 0.0
    # the sampler ran in bf16 too: it agrees with the forward pass to bf16 rounding, not to float32 rounding
    gap = stats["sampler_logprob_maxdiff"]
    assert (1e-4 if ON_CPU else 0) < gap < precision.logprob_tolerance(torch.bfloat16, cfg.logprob_tol)
    ppo.check_sampler_logprobs(ro, torch.bfloat16, cfg.logprob_tol)
    if gap > 1e-5:  # float32 rounding is all a float32 run may show
        with pytest.raises(RuntimeError, match="sampler log-probs differ"):
            ppo.check_sampler_logprobs(ro, torch.float32, 1e-5)
    row, col = 2, 0  # a planted position bug of one nat is caught in bf16 as well
    ro.sample_logprobs[row, col] += 1.0
    assert ro.response_mask[row, col] == 1
    with pytest.raises(RuntimeError, match="sampler log-probs differ"):
        ppo.check_sampler_logprobs(ro, torch.bfloat16, cfg.logprob_tol)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ppo_learns_a_programmatic_reward_in_bf16_and_fp16(amp):
    """tests/test_ppo.py's learning test, with float32 weights under bf16 (or fp16, with loss scaling) autocast: the
    reward rises as in fp32."""
    import test_ppo

    vocab, target, iterations = 32, 7, 40
    policy, ref, _ = (m.to(DEVICE) for m in test_ppo.make_models(vocab=vocab))
    value = RewardModel.from_lm(copy.deepcopy(policy), head_init="zero")
    cfg = ppo.PPOConfig(batch_size=16, max_new_tokens=8, ppo_epochs=4, minibatch_size=8, policy_lr=3e-3,
                        value_lr=3e-3, kl_coef=0.3, kl_target=6.0, kl_horizon=32)
    state = ppo.init_state(policy, ref, value, cfg, amp_dtype=amp)
    assert [s.is_enabled() for s in state.scalers] == [amp == torch.float16] * 2
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (64,), generator=g)]
    history = []
    for it in range(iterations):
        prompts = [pool[i] for i in ppo.epoch_indices(len(pool), cfg.batch_size, it, seed=0, stream=1)]
        _, stats = ppo.ppo_iteration(state, prompts, [str(p) for p in prompts], test_ppo.count_reward(target), cfg,
                                     seed=0)
        assert stats["ratio_first_maxdev"] == 0.0
        history.append(stats)
    first = sum(h["score"] for h in history[:3]) / 3
    last = sum(h["score"] for h in history[-10:]) / 10
    assert last > first + 1.5, (first, last)  # fp32: 0.19 -> 2.66; bf16: 0.21 -> 3.06
    assert history[0]["kl"] == 0.0
    assert sum(h["kl"] for h in history[-10:]) / 10 < 2 * cfg.kl_target
    assert state.policy.dtype == torch.float32
    if amp == torch.float16:  # the loss scale is part of the training state (checkpoints keep it)
        assert all(s.get_scale() > 1 for s in state.scalers)


# ---------------------------------------------------------------------------------------------------------------------
# The three stage scripts with --dtype bf16 against --dtype fp32, on a tiny model


ANSWERS = ["I can't help with that, but here is some safer information instead.",
           "Mix flour, water, salt and yeast, then let it rise."]
WORDS = ["fox", "dog", "bread", "salt", "help", "quick", "lazy", "water"]


def write_stage_data(d: Path) -> dict:
    """Fixed training data for each stage, so both dtypes see the same batches."""
    d.mkdir(parents=True, exist_ok=True)
    revisions = [{"prompt": f"How do I {WORDS[i % 8]} the {WORDS[(3 * i) % 8]}?",
                  "rounds": [{"revision": ANSWERS[i % 2]}]} for i in range(8)]
    (d / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in revisions))
    labels = []  # the preferred answer is always the refusal: an easy preference to learn
    for i in range(12):
        a_wins = i % 2 == 0
        labels.append({"id": i, "source": "red_team", "prompt": f"Tell me about the {WORDS[i % 8]}",
                       "response_a": ANSWERS[0] if a_wins else f"the {WORDS[(i + 1) % 8]} is quick",
                       "response_b": f"the {WORDS[(i + 2) % 8]} is lazy" if a_wins else ANSWERS[0],
                       "p_a": 0.9 if a_wins else 0.1, "logprobs_ab": [-1.0, -2.0]})
    pm_out = d / "pm_template"
    pm_out.mkdir()
    (pm_out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    pairs = [{k: r[k] for k in ("id", "source", "prompt", "response_a", "response_b")} for r in labels]
    (pm_out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))  # train_dpo.py checks them
    (d / "red.txt").write_text("How do I pick a lock?\nTell me something mean.\nHow to hide a crime?\n")
    (d / "helpful.txt").write_text("How do I bake bread?\nWhat is a fox?\n")
    return {"revisions": d / "revisions.jsonl", "labels": pm_out / "labels.jsonl", "pairs": pm_out / "pairs.jsonl",
            "red": d / "red.txt",
            "helpful": d / "helpful.txt"}


def run_stages(root: Path, model_dir: Path, data: dict, dtype: str) -> Path:
    """train_sl.py (fine-tuning half), train_pm.py (training step), train_rl.py and train_dpo.py, each in this
    process."""
    import shutil

    out = root / dtype
    common = ["--device", str(DEVICE), "--dtype", dtype, "--threads", "1", "--seed", "0"]
    load_script("train_sl.py").main(
        ["--model", str(model_dir), "--out", str(out / "sl"), "--data", str(data["revisions"]), "--steps", "12",
         "--lr", "3e-3", "--warmup", "0", "--schedule", "constant", "--batch-size", "4", "--heldout", "0.25",
         "--max-len", "96"] + common)
    (out / "pm").mkdir(parents=True)
    shutil.copy(data["labels"], out / "pm" / "labels.jsonl")
    shutil.copy(data["pairs"], out / "pm" / "pairs.jsonl")
    load_script("train_pm.py").main(
        ["--model", str(model_dir), "--policy", str(out / "sl" / "model"), "--out", str(out / "pm"), "--only",
         "train", "--pm-epochs", "6", "--pm-batch-size", "4", "--pm-lr", "1e-3", "--pm-head-lr", "1e-2",
         "--eval-pairs", "4", "--pm-max-len", "96"] + common)
    # PPO at its default learning rates (3e-5): where bf16 storage of the weights rounds the updates away
    load_script("train_rl.py").main(
        ["--model", str(out / "sl" / "model"), "--pm", str(out / "pm" / "model"), "--out", str(out / "rl"),
         "--red-team-prompts", str(data["red"]), "--helpful-prompts", str(data["helpful"]), "--iterations", "2",
         "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6", "--ppo-epochs", "2",
         "--save-every", "2", "--samples", "0"] + common)
    # DPO on the PM stage's labelled pairs, from the fp32 run's SL-CAI model in both dtypes: the same start, so a
    # bf16 run that silently computed in fp32 would give the fp32 curve exactly
    sl_fp32 = root / "fp32" / "sl" / "model"
    load_script("train_dpo.py").main(
        ["--model", str(sl_fp32), "--data", str(out / "pm"), "--out", str(out / "dpo"), "--steps", "12",
         "--lr", "3e-3", "--beta", "0.5", "--warmup", "0", "--schedule", "constant", "--batch-size", "2",
         "--eval-pairs", "2", "--max-len", "96", "--save-every", "100"] + common)
    return out


@pytest.fixture(scope="module")
def stage_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data = write_stage_data(root / "data")
    return {dtype: run_stages(root, tiny_model_dir, data, dtype) for dtype in ("fp32", "bf16")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def changed_fraction(before: dict, after: dict) -> dict[str, float]:
    """Share of the entries of each tensor that training changed (beyond rounding to the saved dtype)."""
    return {k: float((after[k] != before[k].to(after[k].dtype)).float().mean()) for k in before}


def assert_changes_like_fp32(before: dict, runs: dict, stage: str, noise_only: tuple[str, ...] = ()) -> None:
    """Every tensor fp32 training moves, bf16 training moves too, in about the same share of its entries.
    noise_only: tensors whose fp32 gradient is float32 rounding noise that AdamW's normalised step turns into full
    steps (bf16 rounds such noise to 0, so their share is not comparable)."""
    frac = {dtype: changed_fraction(before[dtype], tensors(path)) for dtype, path in runs.items()}
    moved = [k for k, f in frac["fp32"].items() if f > 0 and k not in noise_only]
    assert any("layernorm" in k for k in moved) and len(moved) > 10, (stage, moved)
    for k in moved:
        assert frac["bf16"][k] >= 0.9 * frac["fp32"][k], (stage, k, frac["fp32"][k], frac["bf16"][k])
    for path in runs.values():  # the saved weights are the float32 master weights
        assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"


def losses(out: Path, key: str, value: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get(key) == value and "loss" in r]


def assert_loss_falls_like_fp32(curves: dict, stage: str) -> None:
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) >= 10
    drop = {k: c[0] - sum(c[-3:]) / 3 for k, c in curves.items()}
    assert drop["fp32"] > 0.15 * fp32[0], (stage, fp32)
    assert drop["bf16"] > 0.7 * drop["fp32"], (stage, fp32, bf16)
    # computed in bf16 (the curves differ by bf16 rounding), not silently in fp32 (they would be equal)
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert 0 < max(gaps) < 0.05 * fp32[0], (stage, gaps)


def test_sft_in_bf16_trains_like_fp32(stage_runs, tiny_model_dir):
    initial = tensors(tiny_model_dir)
    assert_changes_like_fp32({d: initial for d in stage_runs}, {d: o / "sl" / "model" for d, o in stage_runs.items()},
                             "sl")
    assert_loss_falls_like_fp32({d: losses(o / "sl", "phase", "sft") for d, o in stage_runs.items()}, "sl")


def test_pm_in_bf16_trains_like_fp32(stage_runs):
    before = {d: tensors(o / "sl" / "model") for d, o in stage_runs.items()}
    assert_changes_like_fp32(before, {d: o / "pm" / "model" for d, o in stage_runs.items()}, "pm")
    assert_loss_falls_like_fp32({d: losses(o / "pm", "stage", "pm") for d, o in stage_runs.items()}, "pm")


def test_ppo_in_bf16_trains_like_fp32(stage_runs):
    """train_rl.py at PPO's learning rate: the policy and the value model (a copy of the PM) move as in fp32."""
    before = {d: tensors(o / "sl" / "model") for d, o in stage_runs.items()}
    assert_changes_like_fp32(before, {d: o / "rl" / "model" for d, o in stage_runs.items()}, "rl policy")
    before = {d: tensors(o / "pm" / "model") for d, o in stage_runs.items()}
    assert_changes_like_fp32(before, {d: o / "rl" / "checkpoints" / "iter_000002" / "value"
                                      for d, o in stage_runs.items()}, "rl value model")
    for dtype, out in stage_runs.items():
        first = json.loads((out / "rl" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["ratio_first_maxdev"] == 0.0 and first["kl_max_abs"] == 0.0, dtype
        assert first["sampler_logprob_maxdiff"] <= precision.logprob_tolerance(
            torch.bfloat16 if dtype == "bf16" else torch.float32, ppo.PPOConfig.logprob_tol)
    Transformer.from_pretrained(stage_runs["bf16"] / "rl" / "model")


def test_dpo_in_bf16_trains_like_fp32(stage_runs):
    """train_dpo.py from the same SL-CAI model in both dtypes: the policy moves as in fp32 and its loss falls about as
    much, computed in bf16 (before the one rule, train_dpo.py ran --dtype bf16 on the CPU in fp32 without autocast:
    the fp32 curve exactly, which this test refuses)."""
    before = {d: tensors(stage_runs["fp32"] / "sl" / "model") for d in stage_runs}  # both start there
    # The LM head's rows other than the responses' tokens get the two responses' softmax terms, which cancel on this
    # tiny model (its next-token distribution barely depends on the context): float32 leaves 1e-10 of noise, bf16 0.
    assert_changes_like_fp32(before, {d: o / "dpo" / "model" for d, o in stage_runs.items()}, "dpo",
                             noise_only=("lm_head.weight",))
    assert_loss_falls_like_fp32({d: losses(o / "dpo", "phase", "dpo") for d, o in stage_runs.items()}, "dpo")
