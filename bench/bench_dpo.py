"""Wall time and peak memory of one DPO step: minicai (train_dpo.py) vs TRL 1.12's DPOTrainer, same model, same
data, same settings, in one run.

Settings: the default model (SmolLM2-135M-Instruct) as policy and frozen reference, fp32, --threads threads, no
gradient checkpointing, the sigmoid (eq. 7) loss with beta 0.1 and hard labels (TRL has no soft labels: every pair's
first response is the chosen one, p_a = 1 for minicai), --pairs pairs per step (2 rows each), one micro-batch, AdamW
(fused, betas 0.9/0.95, no weight decay, constant learning rate), gradient-norm clip 1. The data: the first --pairs
questions of bench_ppo.py, each answered twice by the model itself (temperature 1, seed 0, exactly --new-tokens
tokens, no stop token), generated once here and given to both sides as the same text. A step is everything from
the batch to the updated weights: the reference's no-grad forward pass, the policy's forward and backward passes,
the clip and the AdamW step (TRL: on_step_begin to on_step_end; tokenisation happens before either clock starts).
Each side runs in its own subprocess (so peak memory is its own) for --steps steps; the first is a warm-up and the
mean of the rest is reported. As a check that both compute the same thing, each side's first-step loss (log 2:
policy == reference) and mean chosen-response log-prob are printed too.

    pip install -r bench/requirements.txt      # trl==1.12.0
    python bench/bench_dpo.py [--steps 4] [--threads 2] [--pairs 8] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import QUESTIONS, bench_parser, peak_rss_gib, print_result, print_table, run_side, start  # noqa: E402

BETA, LR = 0.1, 5e-6


def make_pairs(model_dir: Path, pairs: int, new_tokens: int) -> list[dict]:
    """{prompt, chosen, rejected} text: two temperature-1 samples of the model per question."""
    from minicai.model import Transformer
    from minicai.sampling import generate, response_ids
    from minicai.tokenizer import ChatTokenizer

    if pairs > len(QUESTIONS):
        sys.exit(f"--pairs {pairs}: at most {len(QUESTIONS)}")
    tok = ChatTokenizer.from_dir(model_dir)
    model = Transformer.from_pretrained(model_dir, fast=True).eval()
    questions = QUESTIONS[:pairs]
    ids = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    gen = generate(model, [x for x in ids for _ in range(2)], new_tokens, temperature=1.0, stop_ids=(),
                   pad_id=tok.pad_id, seed=0)
    text = [tok.decode(response_ids(gen, i, ())) for i in range(2 * pairs)]
    return [{"prompt": q, "chosen": text[2 * i], "rejected": text[2 * i + 1]} for i, q in enumerate(questions)]


def run_minicai(model_dir: Path, data: list[dict], steps: int) -> dict:
    import copy

    from minicai.model import Transformer
    from minicai.tokenizer import ChatTokenizer
    from train_dpo import DPOConfig, collate_pairs, dpo_step, encode_pairs, make_optimizer

    tok = ChatTokenizer.from_dir(model_dir)
    policy = Transformer.from_pretrained(model_dir, fast=True)  # as train_dpo.py loads it on the CPU (fast.py)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    cfg = DPOConfig(beta=BETA, lr=LR, batch_size=len(data), max_len=1024, warmup=0, schedule="constant", clip=1.0)
    records = [{"id": i, "prompt": d["prompt"], "response_a": d["chosen"], "response_b": d["rejected"],
                "finished": [True, True], "p_a": 1.0} for i, d in enumerate(data)]
    pairs, dropped = encode_pairs(tok, records, cfg.max_len)
    assert not dropped
    policy.train()
    opt = make_optimizer(policy, cfg)
    rows = []
    for i in range(steps):
        start = time.perf_counter()
        batch = collate_pairs(pairs, tok.pad_id, policy.device)
        stats = dpo_step(policy, ref, opt, [batch], cfg)
        rows.append({"step_s": time.perf_counter() - start, "loss": stats["loss"], "logps_chosen": stats["logp_a"]})
        print(f"minicai step {i}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"steps": rows, "peak_rss_gib": peak_rss_gib()}


def run_trl(model_dir: Path, data: list[dict], steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": d["prompt"]}] for d in data],
        "chosen": [[{"role": "assistant", "content": d["chosen"]}] for d in data],
        "rejected": [[{"role": "assistant", "content": d["rejected"]}] for d in data],
    })
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), per_device_train_batch_size=len(data),
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, beta=BETA, loss_type=["sigmoid"], max_length=1024, precompute_ref_log_probs=False,
        optim="adamw_torch_fused", adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0,
    )
    rows: list[dict] = []
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            marks["start"] = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            rows.append({"step_s": time.perf_counter() - marks["start"]})
            print(f"trl step {len(rows) - 1}: {rows[-1]}", file=sys.stderr, flush=True)

    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tok,
                         callbacks=[StepTimer()])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    if logged:
        rows[0].update(loss=logged[0]["loss"], logps_chosen=logged[0].get("logps/chosen"))
    return {"steps": rows, "peak_rss_gib": peak_rss_gib()}


def summarise(result: dict) -> dict:
    rows = result["steps"][1:] or result["steps"]  # drop the warm-up step
    return {"step_s": sum(r["step_s"] for r in rows) / len(rows), "peak_rss_gib": result["peak_rss_gib"],
            "timed_steps": len(rows), "first_loss": result["steps"][0].get("loss"),
            "first_logps_chosen": result["steps"][0].get("logps_chosen")}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=4, help="DPO steps per side; the first is a warm-up")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (2 rows each; at most 16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per response")
    parser.add_argument("--side", choices=["minicai", "trl"], help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--data", help=argparse.SUPPRESS)  # internal: the pairs, as JSON
    args = parser.parse_args()
    import torch

    model_dir = start(args)
    if args.side:
        data = json.loads(Path(args.data).read_text())
        result = (run_minicai if args.side == "minicai" else run_trl)(model_dir, data, args.steps)
        print_result(result)
        return
    data_file = Path(tempfile.mkdtemp(prefix="bench_dpo_")) / "pairs.json"
    data_file.write_text(json.dumps(make_pairs(model_dir, args.pairs, args.new_tokens)))
    results = {}
    for side in ("minicai", "trl"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--threads", str(args.threads),
               "--model", str(model_dir), "--data", str(data_file)]
        results[side] = summarise(run_side(side, cmd, {"TOKENIZERS_PARALLELISM": "false"}))
        print(f"{side}: {results[side]}", flush=True)
    a, b = results["minicai"], results["trl"]
    print(f"\nmodel {model_dir}; torch {torch.__version__}; {args.threads} threads; fp32; {args.pairs} pairs "
          f"({2 * args.pairs} rows) per step, {args.new_tokens}-token responses, beta {BETA}\n")
    print_table(a, b, (("step_s", "DPO step (s)"), ("peak_rss_gib", "peak RSS (GiB)")), digits=2)
    print(f"\nfirst step: loss {a['first_loss']} vs {b['first_loss']} (log 2 = 0.6931), mean chosen log-prob "
          f"{a['first_logps_chosen']} vs {b['first_logps_chosen']}")


if __name__ == "__main__":
    main()
