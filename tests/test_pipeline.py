"""pipeline.py: every preset's flags are accepted by the stage scripts, the stages are wired to each other's
outputs, finished stages are reused, a failing stage stops the run, and the whole pipeline runs end to end on a
tiny random model (SL-CAI -> PM -> RL-CAI -> report) in seconds."""

import json
from pathlib import Path

import pytest
from conftest import load_script

from minicai import MinicaiError

REPO = Path(__file__).resolve().parents[1]




pipeline = load_script("pipeline.py")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The in-process evaluation applies --threads to this process; put torch's thread count back afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", sorted(pipeline.PRESETS))
def test_every_preset_parses_in_every_stage_script(preset, tmp_path):
    """The presets name real flags of the stage scripts (which may change: this test says when)."""
    from minicai import compare

    args = pipeline.parse_args(["--preset", preset, "--out", str(tmp_path), "--model", "m", "--threads", "1",
                                "--dry-run"])
    for stage in ("sl", "pm", "rl") + pipeline.METHOD_STAGES:
        script = load_script(pipeline.SCRIPTS[stage])
        parsed = script.parse_args(pipeline.stage_argv(stage, args, "m", tmp_path))
        assert parsed.out == str(tmp_path / stage) and parsed.seed == 0 and parsed.threads == 1
        if stage in ("grpo", "rloo"):
            assert parsed.advantage == stage
    parsed = compare.build_parser().parse_args(pipeline.stage_argv("eval", args, "m", tmp_path))
    assert parsed.out == str(tmp_path / "report")


@pytest.mark.parametrize("stage", ["sl", "pm", "rl", "dpo"])
def test_each_scripts_gpu_suggestion_is_the_gpu_preset(stage, capsys):
    """minicai/presets.py is the one source of suggested settings: a script's --help shows the gpu preset's command
    for its stage, every flag and value in order (so they cannot disagree), and no measured run time."""
    import re
    import shlex

    from minicai.presets import PRESETS

    script = pipeline.SCRIPTS[stage]
    with pytest.raises(SystemExit):
        load_script(script).parse_args(["--help"])
    text = capsys.readouterr().out
    command = re.search(rf"^  python {script} .*?(?<!\\)$", text, re.M | re.S).group(0)
    assert shlex.split(command.replace("\\\n", " ")) == ["python", script, "--device", "cuda", *PRESETS["gpu"][stage]]
    assert not re.search(r"\bminutes?\b|\bhours?\b", text)


def test_stage_wiring(tmp_path):
    args = pipeline.parse_args(["--out", str(tmp_path), "--seed", "3", "--device", "cpu", "--dry-run",
                                "--rl-args", "--iterations 7"])
    sl = pipeline.stage_argv("sl", args, "INIT", tmp_path)
    pm = pipeline.stage_argv("pm", args, "INIT", tmp_path)
    rl = pipeline.stage_argv("rl", args, "INIT", tmp_path)
    ev = pipeline.stage_argv("eval", args, "INIT", tmp_path)
    flag = lambda argv, name: argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # noqa: E731  (last one wins)
    assert flag(sl, "--model") == "INIT"
    assert flag(pm, "--model") == "INIT" and flag(pm, "--policy") == str(tmp_path / "sl" / "model")
    assert flag(rl, "--model") == str(tmp_path / "sl" / "model") and flag(rl, "--pm") == str(tmp_path / "pm" / "model")
    assert flag(rl, "--iterations") == "7" and flag(rl, "--seed") == "3" and flag(rl, "--device") == "cpu"
    assert ev[:3] == ["initial=INIT", f"sl={tmp_path / 'sl' / 'model'}", f"rl={tmp_path / 'rl' / 'model'}"]
    assert flag(ev, "--judge") == "INIT" and flag(ev, "--out") == str(tmp_path / "report")
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--stages", "sl,xx"])


def test_missing_model_and_failing_stage(tmp_path, tiny_model_dir):
    with pytest.raises(MinicaiError, match="config.json"):
        pipeline.main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    with pytest.raises(MinicaiError, match="stage sl .* exit status 2"):
        pipeline.main(["--tiny", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--stages", "sl",
                       "--sl-args", "--rounds -1"])


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    log = pipeline.main(["--tiny", "--model", str(tiny_model_dir), "--out", str(out), "--threads", "1"])
    assert [s["stage"] for s in log["stages"]] == ["sl", "pm", "rl", "eval"]
    assert all(s["status"] == "ran" for s in log["stages"])
    for stage in ("sl", "pm"):
        assert (out / stage / "model" / "done.json").is_file()
    assert (out / "rl" / "model" / "config.json").is_file() and (out / "rl" / "metrics.jsonl").is_file()
    md = (out / "report" / "report.md").read_text()
    for heading in ("## Preference-model score", "## Pairwise judge: win rates and Elo", "## Evasiveness",
                    "## RL-CAI training curves"):
        assert heading in md
    assert "| `initial` | 2 |" in md and "`rl` vs `sl`" in md
    report = json.loads((out / "report" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["initial", "sl", "rl"]
    assert report["rl"]["iterations"] == 2
    assert json.loads((out / "pipeline.json").read_text())["preset"] == "tiny"

    # a rerun reuses the finished stages instead of starting over
    again = pipeline.main(["--tiny", "--model", str(tiny_model_dir), "--out", str(out), "--stages", "sl,pm"])
    assert [s["status"] for s in again["stages"]] == ["reused", "reused"]


def test_gpu_preset_flags_run_on_the_cpu_in_bf16(tmp_path, tiny_model_dir, capfd):
    """The gpu preset's flags (bf16 mixed precision, gradient accumulation, large generation/label/PM batches) on a
    tiny model on the CPU, sizes cut to the tiny preset's (later flags win); --dry-run prints the real commands."""
    log = pipeline.main(["--preset", "gpu", "--dry-run", "--out", str(tmp_path / "dry")])
    assert [s["status"] for s in log["stages"]] == ["dry-run"] * 4
    assert "--batch-size 64" in log["stages"][2]["command"]
    tiny = pipeline.PRESETS["tiny"]
    cut = {"sl": tiny["sl"] + ["--response-tokens", "6", "--critique-tokens", "6", "--revision-tokens", "6"],
           "pm": tiny["pm"], "rl": tiny["rl"], "eval": tiny["eval"]}
    out = tmp_path / "runs"
    argv = ["--preset", "gpu", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--dtype", "bf16",
            "--threads", "1"]
    for stage, flags in cut.items():
        argv += [f"--{stage}-args", " ".join(flags)]
    capfd.readouterr()
    log = pipeline.main(argv)
    assert all(s["status"] == "ran" for s in log["stages"])
    assert "--grad-accum 2" in log["stages"][0]["command"] and "--dtype bf16" in log["stages"][2]["command"]
    assert "check before the first update: max |ratio - 1| = 0," in capfd.readouterr().out
    metrics = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["kl_max_abs"] == 0.0 and metrics[0]["ratio_first_maxdev"] == 0.0
    assert json.loads((out / "rl" / "model" / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "report" / "report.md").is_file()


def test_pipeline_with_two_processes_per_training_stage_finishes_and_resumes(tmp_path, tiny_model_dir):
    """--nproc-per-node 2: each training stage under torchrun with 2 gloo processes on the CPU; RL resumes."""
    out = tmp_path / "runs"
    base = ["--tiny", "--model", str(tiny_model_dir), "--out", str(out), "--threads", "1", "--device", "cpu",
            "--nproc-per-node", "2", "--stages", "sl,pm,rl"]
    log = pipeline.main(base)
    assert [s["status"] for s in log["stages"]] == ["ran"] * 3
    assert "torch.distributed.run --standalone --nproc_per_node 2" in log["stages"][2]["command"]
    for stage in ("sl", "pm"):
        assert (out / stage / "model" / "done.json").is_file()
    metrics = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]  # one line per iteration: only rank 0 writes
    assert metrics[0]["kl_max_abs"] == 0.0 and metrics[0]["ratio_first_maxdev"] == 0.0
    # resume: two more iterations start from the newest checkpoint
    log = pipeline.main(base + ["--rl-args", "--iterations 4"])
    assert [s["status"] for s in log["stages"]] == ["reused", "reused", "ran"]
    metrics = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]


def test_rl_methods_wiring(tmp_path):
    """--rl-methods: the rl stage expands into one stage per method, each from the same SL-CAI model and PM stage
    into its own folder; the evaluation gets every method's model, its cost.json and the SL-CAI model as the KL
    reference. The default (ppo) is today's pipeline."""
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert pipeline.parse_args(["--out", str(tmp_path)]).stages == ["sl", "pm", "rl", "eval"]
    args = pipeline.parse_args(["--out", str(tmp_path), "--rl-methods", "grpo,ppo,dpo", "--dry-run",
                                "--dpo-args", "--beta 0.2"])
    assert args.stages == ["sl", "pm", "rl", "dpo", "grpo", "eval"]
    sl, pm = str(tmp_path / "sl" / "model"), str(tmp_path / "pm" / "model")
    dpo = pipeline.stage_argv("dpo", args, "INIT", tmp_path)
    assert flag(dpo, "--model") == sl and flag(dpo, "--data") == str(tmp_path / "pm") and flag(dpo, "--beta") == "0.2"
    grpo = pipeline.stage_argv("grpo", args, "INIT", tmp_path)
    assert flag(grpo, "--model") == sl and flag(grpo, "--pm") == pm and flag(grpo, "--advantage") == "grpo"
    assert flag(grpo, "--out") == str(tmp_path / "grpo")
    ev = pipeline.stage_argv("eval", args, "INIT", tmp_path)
    assert ev[:5] == ["initial=INIT", f"sl={sl}"] + [f"{m}={tmp_path / m / 'model'}" for m in ("rl", "dpo", "grpo")]
    assert [ev[i + 1] for i, a in enumerate(ev) if a == "--cost"] == [
        f"{m}={tmp_path / m / 'cost.json'}" for m in ("rl", "dpo", "grpo")]
    assert flag(ev, "--kl-reference") == "sl"
    assert pipeline.parse_args(["--rl-methods", "dpo", "--stages", "rl"]).stages == ["dpo"]
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--rl-methods", "ppo,a2c"])


def test_ppo_dpo_grpo_side_by_side_on_a_tiny_model(tmp_path, tiny_model_dir):
    """--rl-methods ppo,dpo,grpo end to end: every method trains from the same SL-CAI model and PM stage, writes its
    cost.json, and the report has a row per model with its KL to SL-CAI, its wall time and memory, and the
    reward-KL frontier plot; a rerun skips the finished stages."""
    out = tmp_path / "runs"
    argv = ["--tiny", "--model", str(tiny_model_dir), "--out", str(out), "--threads", "1",
            "--rl-methods", "ppo,dpo,grpo"]
    log = pipeline.main(argv)
    assert [s["stage"] for s in log["stages"]] == ["sl", "pm", "rl", "dpo", "grpo", "eval"]
    assert all(s["status"] == "ran" for s in log["stages"])
    for stage in ("rl", "dpo", "grpo"):
        cost = json.loads((out / stage / "cost.json").read_text())
        assert cost["seconds"] > 0 and cost["peak_rss_mib"] > 10 and cost["sessions"] == 1
        assert (out / stage / "model" / "config.json").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    names = ["initial", "sl", "rl", "dpo", "grpo"]
    assert [m["name"] for m in report["models"]] == names
    assert report["kl"]["reference"] == "sl" and sorted(report["kl"]["models"]) == sorted(set(names) - {"sl"})
    assert all(report["kl"]["models"][m]["n"] == 2 for m in ("rl", "dpo", "grpo"))
    assert sorted(report["cost"]) == ["dpo", "grpo", "rl"]
    md = (out / "report" / "report.md").read_text()
    assert "## Methods side by side" in md
    for name in ("rl", "dpo", "grpo"):
        assert f"| `{name}` |" in md.split("## Methods side by side")[1].split("\n## ")[0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert "reward_kl_frontier.png" in report["plots"] and (out / "report" / "reward_kl_frontier.png").is_file()

    # a rerun reuses the finished stages: dpo by its done.json, rl and grpo by their checkpoints (no new session)
    again = pipeline.main(argv[:-2] + ["--rl-methods", "ppo,dpo,grpo", "--stages", "sl,pm,rl"])
    assert [s["status"] for s in again["stages"]] == ["reused", "reused", "ran", "reused", "ran"]
    for stage in ("rl", "dpo", "grpo"):
        assert json.loads((out / stage / "cost.json").read_text())["sessions"] == 1
