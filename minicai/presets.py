"""Run sizes: each stage script's size flags per preset (cpu, gpu, tiny), the one source of suggested settings.

pipeline.py passes PRESETS[preset][stage] to each stage (its --preset; its --help says what each preset is for);
the training scripts' --help shows the "gpu" entry as the suggested command for one large GPU (suggested_command).
Flags only, no measurements: how long a preset takes on which machine is in BENCHMARKS.md and results/.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "sl": [],
        "pm": [],
        "rl": [],
        "dpo": [],
        "grpo": ["--advantage", "grpo"],
        "rloo": ["--advantage", "rloo"],
        "eval": ["--limit", "16", "--hhh-limit", "100"],
    },
    "gpu": {
        "sl": ["--num-prompts", "240", "--num-helpful", "240", "--rounds", "4", "--num-examples", "2",
               "--gen-batch-size", "64", "--response-tokens", "192", "--critique-tokens", "128",
               "--revision-tokens", "192", "--epochs", "2", "--batch-size", "16", "--grad-accum", "2",
               "--max-len", "512", "--lr", "1e-5"],
        "pm": ["--num-red-team", "240", "--num-helpful", "240", "--max-new-tokens", "192", "--gen-batch-size", "64",
               "--label-batch-size", "32", "--pm-batch-size", "16", "--pm-max-len", "512", "--eval-pairs", "48"],
        "rl": ["--iterations", "200", "--batch-size", "64", "--minibatch-size", "16", "--max-new-tokens", "128",
               "--pm-batch-size", "32", "--save-every", "10"],
        "dpo": ["--epochs", "2", "--batch-size", "16", "--max-len", "512", "--lr", "1e-6", "--eval-pairs", "48"],
        "grpo": ["--advantage", "grpo", "--group-size", "8", "--iterations", "200", "--batch-size", "64",
                 "--minibatch-size", "16", "--max-new-tokens", "128", "--pm-batch-size", "32", "--save-every", "10"],
        "rloo": ["--advantage", "rloo", "--group-size", "8", "--iterations", "200", "--batch-size", "64",
                 "--minibatch-size", "16", "--max-new-tokens", "128", "--pm-batch-size", "32", "--save-every", "10"],
        "eval": ["--limit", "60", "--max-new-tokens", "192", "--gen-batch-size", "32", "--judge-batch-size", "32",
                 "--pm-batch-size", "32"],
    },
    "tiny": {
        "sl": ["--num-prompts", "2", "--num-helpful", "1", "--rounds", "1", "--num-examples", "0",
               "--max-new-tokens", "6", "--steps", "1", "--batch-size", "2", "--max-len", "512"],
        "pm": ["--num-red-team", "2", "--num-helpful", "2", "--max-new-tokens", "6", "--eval-pairs", "1",
               "--fewshot-count", "0", "--pm-max-len", "512"],
        "rl": ["--iterations", "2", "--batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "6",
               "--ppo-epochs", "1", "--max-prompts", "4", "--max-prompt-tokens", "4096", "--save-every", "1"],
        "dpo": ["--steps", "2", "--batch-size", "1", "--eval-pairs", "1", "--max-len", "512", "--save-every", "1"],
        "grpo": ["--advantage", "grpo", "--group-size", "2", "--iterations", "2", "--batch-size", "4",
                 "--minibatch-size", "2", "--max-new-tokens", "6", "--ppo-epochs", "1", "--max-prompts", "4",
                 "--max-prompt-tokens", "4096", "--save-every", "1"],
        "rloo": ["--advantage", "rloo", "--group-size", "2", "--iterations", "2", "--batch-size", "4",
                 "--minibatch-size", "2", "--max-new-tokens", "6", "--ppo-epochs", "1", "--max-prompts", "4",
                 "--max-prompt-tokens", "4096", "--save-every", "1"],
        "eval": ["--limit", "2", "--max-new-tokens", "6", "--hhh-limit", "2", "--samples", "1", "--no-toxicity"],
    },
}


def suggested_command(script: str, stage: str, preset: str = "gpu", width: int = 110) -> str:
    """A stage's preset as the command a user types, for a script's --help: "python train_sl.py --device cuda
    <PRESETS[preset][stage]>", indented, wrapped at `width` with shell line continuations (one flag and its value
    stay on one line)."""
    flags = PRESETS[preset][stage]
    words = []  # each flag with its value: "--rounds 4", "--force"
    for f in flags:
        if f.startswith("--") or not words:
            words.append(f)
        else:
            words[-1] += f" {f}"
    device = " --device cuda" if preset == "gpu" else ""
    lines = [f"  python {script}{device}"]
    for w in words:
        if len(lines[-1]) + len(w) + 3 > width:  # + " " before and " \\" after
            lines.append("     ")
        lines[-1] += f" {w}"
    return " \\\n".join(lines)
