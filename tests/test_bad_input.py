"""Bad input gets one line, never a traceback (issue 15): a table of bad inputs for every file the project reads.

Each case runs a stage script on a tiny random model with a bad file or flag and must end with exit status 2, one
last line `error: ...` that names the file (and line) and says the fix, no traceback, and nothing new in the
output folder. To stay fast, one driver subprocess runs the whole table, calling each script's main() through
minicai.run.cli_main exactly as `python train_sl.py ...` does; the two holes the issue found also run as real
subprocesses (test_the_two_holes_as_real_commands).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {"sl": "train_sl.py", "pm": "train_pm.py", "rl": "train_rl.py", "hhh": "minicai/evaluate.py"}
SL_TINY = ["--only", "generate", "--num-prompts", "1", "--num-helpful", "0", "--rounds", "1", "--num-examples", "0",
           "--max-new-tokens", "2", "--threads", "1"]
RL_TINY = ["--iterations", "1", "--batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "2",
           "--max-prompts", "2", "--threads", "1"]


# ---------------------------------------------------------------------------------------------------------------
# The world the cases damage: a tiny model, a tiny PM, good prompt files


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def build_world(root: Path, tiny_model_dir: Path) -> dict:
    import torch

    from minicai.model import Transformer
    from minicai.reward import RewardModel

    w = {"root": root, "model": tiny_model_dir}
    pm = root / "pm"
    rm = RewardModel.from_lm(Transformer.from_pretrained(tiny_model_dir, dtype=torch.float32))
    rm.save_pretrained(pm)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, pm / f.name)
    w["pm"] = pm
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I bake bread?"}\n{"prompt": "Tell me a joke."}\n')
    w["prompts"] = prompts
    return w


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def damaged_model(w, name: str, edit) -> Path:
    d = copy_model(w["model"], w["root"] / "models" / name)
    edit(d)
    return d


def shard(d: Path, index: dict) -> None:
    """Replace model.safetensors by an index (the weights stay in one shard file named in the index)."""
    os.replace(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
    write(d / "model.safetensors.index.json", json.dumps(index))


def sl(w, out, *extra, model=None) -> list[str]:
    return ["--model", str(model or w["model"]), "--out", str(out), "--red-team", str(w["prompts"]), *SL_TINY,
            *extra]


# Each case: (id, script, setup(w, out) -> argv, words the error line must contain). `out` is the case's output
# folder (it may not exist yet); setup may fill it with the files of an earlier run.
def case_table():
    cases = []

    def case(id_, script, words, marks=()):
        def register(setup):
            cases.append(pytest.param(id_, script, setup, words, id=id_, marks=marks))
            return setup
        return register

    # --- the model directory ------------------------------------------------------------------------------------
    @case("model-dir-missing", "sl", ["no-such-model", "Fix"])
    def _(w, out):
        return sl(w, out, model=w["root"] / "no-such-model")

    @case("model-config-not-json", "sl", ["config.json", "fix"])
    def _(w, out):
        return sl(w, out, model=damaged_model(w, "cfg-json", lambda d: write(d / "config.json", "{not json")))

    @case("model-config-missing-field", "sl", ["config.json", "hidden_size"])
    def _(w, out):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            del cfg["hidden_size"]
            write(d / "config.json", json.dumps(cfg))
        return sl(w, out, model=damaged_model(w, "cfg-field", edit))

    @case("weights-truncated", "sl", ["model.safetensors", "fix"])
    def _(w, out):
        def edit(d):
            data = (d / "model.safetensors").read_bytes()
            write(d / "model.safetensors", data[: len(data) // 2])
        return sl(w, out, model=damaged_model(w, "truncated", edit))

    @case("weights-garbage", "sl", ["model.safetensors", "fix"])
    def _(w, out):
        return sl(w, out, model=damaged_model(w, "garbage", lambda d: write(d / "model.safetensors", b"\0junk" * 9)))

    @case("weights-missing", "sl", ["model.safetensors", "Fix"])
    def _(w, out):
        return sl(w, out, model=damaged_model(w, "noweights", lambda d: (d / "model.safetensors").unlink()))

    @case("shard-index-names-missing-file", "sl", ["model-00002", "fix"])
    def _(w, out):
        def edit(d):
            from safetensors import safe_open
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                names = list(f.keys())
            shard(d, {"metadata": {}, "weight_map": {n: ("model-00002-of-00002.safetensors" if i == 0 else
                                                         "model-00001-of-00001.safetensors")
                                                     for i, n in enumerate(names)}})
        return sl(w, out, model=damaged_model(w, "shard-missing", edit))

    @case("shard-index-points-outside", "sl", ["model.safetensors.index.json", "outside"])
    def _(w, out):
        def edit(d):
            from safetensors import safe_open
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                names = list(f.keys())
            shard(d, {"metadata": {}, "weight_map": {n: "../../prompts.jsonl" if i == 0 else
                                                     "model-00001-of-00001.safetensors" for i, n in enumerate(names)}})
        return sl(w, out, model=damaged_model(w, "shard-outside", edit))

    @case("shard-index-not-json", "sl", ["model.safetensors.index.json", "fix"])
    def _(w, out):
        def edit(d):
            shard(d, {})
            write(d / "model.safetensors.index.json", "{")
        return sl(w, out, model=damaged_model(w, "shard-json", edit))

    @case("tokenizer-json-garbage", "sl", ["tokenizer.json", "fix"])
    def _(w, out):
        return sl(w, out, model=damaged_model(w, "tok", lambda d: write(d / "tokenizer.json", "{\"model\": 3}")))

    @case("tokenizer-config-not-json", "sl", ["tokenizer_config.json", "fix"])
    def _(w, out):
        return sl(w, out, model=damaged_model(w, "tokcfg", lambda d: write(d / "tokenizer_config.json", "{,")))

    # --- constitution and few-shot files ------------------------------------------------------------------------
    @case("constitution-missing", "sl", ["nothing.txt", "fix"])
    def _(w, out):
        return sl(w, out, "--constitution", str(w["root"] / "nothing.txt"))

    @case("constitution-bad-line", "sl", ["bad-constitution.txt:", "fix"])
    def _(w, out):
        return sl(w, out, "--constitution", str(write(w["root"] / "bad-constitution.txt", "[critiques]\nhello\n")))

    @case("constitution-json-wrong-shape", "sl", ["c.json", "fix"])
    def _(w, out):
        return sl(w, out, "--constitution", str(write(w["root"] / "c.json", "[1, 2]")))

    @case("critique-examples-bad-line", "sl", ["ex.jsonl:2", "fix"])
    def _(w, out):
        good = json.dumps({"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                "content": "hello"}],
                           "critique_request": "a",
                           "critique": "b", "revision_request": "c", "revision": "d"})
        path = write(w["root"] / "ex.jsonl", good + "\n{oops\n")
        return sl(w, out, "--examples", str(path), "--num-examples", "1")

    @case("comparison-fewshot-wrong-shape", "pm", ["fs.json", "fix"])
    def _(w, out):
        return ["--model", str(w["model"]), "--policy", str(w["model"]), "--out", str(out),
                "--fewshot", str(write(w["root"] / "fs.json", '{"a": 1}')), "--fewshot-count", "1",
                "--num-red-team", "1", "--num-helpful", "0", "--max-new-tokens", "2", "--threads", "1"]

    # --- prompt sets, in each format ------------------------------------------------------------------------------
    @case("prompts-empty-txt", "sl", ["empty.txt", "no prompts", "fix"])  # hole (a): used to exit 0, doing nothing
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "empty.txt", "")))

    @case("prompts-empty-jsonl", "sl", ["empty.jsonl", "no prompts", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "empty.jsonl", "\n")))

    @case("prompts-jsonl-bad-line", "sl", ["badline.jsonl:2", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "badline.jsonl", '{"prompt": "a"}\n{"prompt": \n'
                                                                                 '{"prompt": "c"}\n')))

    @case("prompts-jsonl-no-prompt-field", "sl", ["nofield.jsonl:1", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "nofield.jsonl", '{"text": "a"}\n')))

    @case("prompts-hh-no-human-turn", "sl", ["hh.jsonl:1", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "hh.jsonl", '{"chosen": "no turns here"}\n')))

    @case("prompts-gz-corrupt", "sl", ["corrupt.jsonl.gz", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "corrupt.jsonl.gz", b"\x1f\x8b\x08junkjunk")))

    @case("prompts-gz-not-utf8", "sl", ["latin.jsonl.gz", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "latin.jsonl.gz",
                                                  gzip.compress('{"prompt": "caf\xe9"}\n'.encode("latin-1")))))

    @case("prompts-unknown-type", "sl", ["prompts.csv", "fix"])
    def _(w, out):
        return sl(w, out, "--red-team", str(write(w["root"] / "prompts.csv", "a,b\n")))

    @case("prompts-missing", "rl", ["nope.jsonl", "fix"])
    def _(w, out):
        return ["--model", str(w["model"]), "--pm", str(w["pm"]), "--out", str(out), *RL_TINY,
                "--red-team-prompts", str(w["root"] / "nope.jsonl"), "--helpful-prompts", str(w["prompts"])]

    # --- the HHH file -------------------------------------------------------------------------------------------------
    @case("hhh-bad-json", "hhh", ["hhh-bad.jsonl:1", "fix"])
    def _(w, out):
        return ["hhh", "--model", str(w["model"]), "--file", str(write(w["root"] / "hhh-bad.jsonl", "{\n")),
                "--out", str(out / "hhh.json"), "--threads", "1"]

    @case("hhh-wrong-layout", "hhh", ["hhh-layout.jsonl:1", "fix"])
    def _(w, out):
        path = write(w["root"] / "hhh-layout.jsonl", json.dumps({"prompt": "x", "corrects": [" (A)"],
                                                                 "incorrects": [" (B)"]}) + "\n")
        return ["hhh", "--model", str(w["model"]), "--file", str(path), "--out", str(out / "hhh.json"),
                "--threads", "1"]

    @case("hhh-missing", "hhh", ["absent.jsonl", "fix"])
    def _(w, out):
        return ["hhh", "--model", str(w["model"]), "--file", str(w["root"] / "absent.jsonl"),
                "--out", str(out / "hhh.json"), "--threads", "1"]

    # --- a PM directory without its head ---------------------------------------------------------------------
    @case("pm-without-head", "rl", ["reward_head.safetensors", "fix"])
    def _(w, out):
        return ["--model", str(w["model"]), "--pm", str(w["model"]), "--out", str(out), *RL_TINY,
                "--red-team-prompts", str(w["prompts"]), "--helpful-prompts", str(w["prompts"])]

    # --- the stages' own files when a rerun resumes ----------------------------------------------------------
    @case("resume-other-settings", "sl", ["--rounds: 2 -> 1", "--force"])
    def _(w, out):
        write(out / "settings.json", json.dumps({**settings_for("sl", sl(w, out)), "rounds": 2}))
        write(out / "revisions.jsonl", "")
        return sl(w, out)

    @case("resume-settings-damaged", "sl", ["settings.json", "Fix"])
    def _(w, out):
        write(out / "settings.json", '{"rounds": ')
        return sl(w, out)

    @case("resume-revisions-bad-middle-line", "sl", ["revisions.jsonl:1", "fix"])
    def _(w, out):
        write(out / "settings.json", json.dumps(settings_for("sl", sl(w, out))))
        write(out / "revisions.jsonl", '{"prompt": \n{"prompt": "x"}\n')
        return sl(w, out)

    @case("resume-rl-checkpoint-damaged", "rl", ["trainer_state.pt", "Fix"])
    def _(w, out):
        argv = ["--model", str(w["model"]), "--pm", str(w["pm"]), "--out", str(out), *RL_TINY, "--iterations", "2",
                "--red-team-prompts", str(w["prompts"]), "--helpful-prompts", str(w["prompts"])]
        write(out / "settings.json", json.dumps(settings_for("rl", argv)))
        write(out / "checkpoints" / "iter_000001" / "trainer_state.pt", b"not a torch file")
        return argv

    @case("resume-rl-policy-weights-damaged", "rl", ["model.safetensors", "fix"])
    def _(w, out):
        import torch
        argv = ["--model", str(w["model"]), "--pm", str(w["pm"]), "--out", str(out), *RL_TINY, "--iterations", "2",
                "--red-team-prompts", str(w["prompts"]), "--helpful-prompts", str(w["prompts"])]
        write(out / "settings.json", json.dumps(settings_for("rl", argv)))
        ck = out / "checkpoints" / "iter_000001"
        copy_model(w["model"], ck / "policy")
        write(ck / "policy" / "model.safetensors", b"garbage")
        torch.save({"iteration": 1}, ck / "trainer_state.pt")
        return argv

    # --- flags out of range -----------------------------------------------------------------------------------
    @case("flag-sl-rounds-negative", "sl", ["--rounds", ">= 0"])
    def _(w, out):
        return sl(w, out, "--rounds", "-1")

    @case("flag-sl-batch-not-a-number", "sl", ["--batch-size", "invalid int"])
    def _(w, out):
        return sl(w, out, "--batch-size", "four")

    @case("flag-threads-zero", "sl", ["--threads", ">= 1"])
    def _(w, out):
        return sl(w, out, "--threads", "0")

    @case("flag-no-cuda", "sl", ["--device cuda", "fix"])
    def _(w, out):
        return sl(w, out, "--device", "cuda")

    @case("flag-rl-fraction", "rl", ["--red-team-fraction", "[0, 1]"])
    def _(w, out):
        return ["--model", str(w["model"]), "--pm", str(w["pm"]), "--out", str(out), *RL_TINY,
                "--red-team-fraction", "2"]

    @case("flag-pm-batch-zero", "pm", ["--pm-batch-size", ">= 1"])
    def _(w, out):
        return ["--model", str(w["model"]), "--policy", str(w["model"]), "--out", str(out), "--pm-batch-size", "0"]

    @case("flag-hhh-limit-negative", "hhh", ["--limit -1", "positive"])
    def _(w, out):
        return ["hhh", "--model", str(w["model"]), "--limit", "-1", "--out", str(out / "hhh.json")]

    return cases


def settings_for(script: str, argv: list[str]) -> dict:
    """What the script records in settings.json for these flags (to fake an earlier run's folder)."""
    from minicai.run import settings_of

    return settings_of(load_script(script).parse_args(argv))


def load_script(script: str):
    if script == "hhh":
        import minicai.evaluate as module
        return module
    return conftest.load_script(SCRIPTS[script])


CASES = case_table()


# Non-finite numbers: the test hook MINICAI_TEST_NONFINITE=phase:N (minicai.run.check_finite) makes the N-th loss
# check of that phase see a NaN. (id, script, hook, setup(w, out) -> argv, words of the error line)
def nan_table():
    def sft(w, out):
        return ["--model", str(w["model"]), "--out", str(out), "--red-team", str(w["prompts"]), "--helpful",
                str(w["prompts"]), "--num-prompts", "1", "--num-helpful", "1", "--rounds", "1", "--num-examples", "0",
                "--max-new-tokens", "2", "--steps", "2", "--batch-size", "1", "--heldout", "0", "--threads", "1"]

    def pm(w, out):
        return ["--model", str(w["model"]), "--policy", str(w["model"]), "--out", str(out), "--red-team",
                str(w["prompts"]), "--helpful", str(w["prompts"]), "--num-red-team", "2", "--num-helpful", "1",
                "--max-new-tokens", "2", "--eval-pairs", "0", "--fewshot-count", "0", "--pm-batch-size", "1",
                "--threads", "1"]

    def rl(w, out):
        return ["--model", str(w["model"]), "--pm", str(w["pm"]), "--out", str(out), *RL_TINY, "--iterations", "2",
                "--save-every", "1", "--ppo-epochs", "1", "--red-team-prompts", str(w["prompts"]), "--helpful-prompts", str(w["prompts"])]

    return [pytest.param("nan-sft", "sl", "sft:2", sft, ["sft step 2", "loss = nan", "Fix"], id="nan-sft"),
            pytest.param("nan-pm", "pm", "pm:2", pm, ["pm step 2", "loss = nan", "Fix"], id="nan-pm"),
            pytest.param("nan-ppo", "rl", "ppo:2", rl, ["ppo step 1 (update 2 of this process)", "loss = nan"],
                         id="nan-ppo")]


NAN_CASES = nan_table()


# ---------------------------------------------------------------------------------------------------------------
# The driver: one subprocess runs every case through cli_main, as the scripts' `if __name__ == "__main__"` does


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def drive(plan_path: str) -> None:
    """Run the cases of a plan file; write {id: {status, stderr, before, after}} next to it."""
    import contextlib
    import io
    import traceback

    import torch

    from minicai import run

    torch.set_num_threads(1)
    plan = json.loads(Path(plan_path).read_text())
    results = {}
    for item in plan:
        module = load_script(item["script"])
        out = Path(item["out"])
        before = listing(out)
        saved_env = dict(os.environ)
        os.environ.update(item["env"])
        run._checks.clear()
        err = io.StringIO()
        status = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                run.cli_main(lambda: module.main(item["argv"]))
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what a user would see as a traceback
                err.write(traceback.format_exc())
                status = "traceback"
        os.environ.clear()
        os.environ.update(saved_env)
        results[item["id"]] = {"status": status, "stderr": err.getvalue(), "before": before, "after": listing(out)}
    Path(plan_path).with_suffix(".results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad_input")
    w = build_world(root, tiny_model_dir)
    plan = []
    for param in CASES + NAN_CASES:
        id_, script, hook, setup = (*param.values[:2], None, param.values[2]) if len(param.values) == 4 else \
            param.values[:4]
        out = root / "runs" / id_
        argv = setup(w, out)
        plan.append({"id": id_, "script": script, "argv": [str(a) for a in argv], "out": str(out),
                     "env": {"MINICAI_TEST_NONFINITE": hook} if hook else {}})
    plan_path = root / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--drive", str(plan_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(plan_path.with_suffix(".results.json").read_text())


def check_one_line_error(status, stderr: str, words: list[str]) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    assert status == 2, f"exit status {status}; stderr:\n{stderr[-2000:]}"
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]  # tqdm redraws with \r
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]!r}"
    return errors[0]


@pytest.mark.parametrize("id_, script, setup, words", CASES)
def test_bad_input(table, id_, script, setup, words):
    result = table[id_]
    check_one_line_error(result["status"], result["stderr"], words)
    assert result["after"] == result["before"], "the output folder changed"


@pytest.mark.parametrize("id_, script, hook, setup, words", NAN_CASES)
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(table, id_, script, hook, setup, words):
    result = table[id_]
    check_one_line_error(result["status"], result["stderr"], words)
    files = result["after"]
    assert not any(f.startswith("model/") for f in files), "no model/ from a run that went NaN"
    if script == "rl":  # iteration 1 was saved before the NaN in iteration 2; nothing of iteration 2 was
        assert any(f.startswith("checkpoints/iter_000001/") for f in files)
        assert not any(f.startswith("checkpoints/iter_000002") for f in files)


def test_the_two_holes_as_real_commands(tmp_path, tiny_model_dir):
    """As a user types them: an empty prompt file (used to exit 0 doing nothing) and a truncated model.safetensors
    (used to end in safetensors' SafetensorError traceback)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    empty = write(tmp_path / "empty.txt", "")
    proc = subprocess.run([sys.executable, "train_sl.py", "--model", str(tiny_model_dir), "--red-team", str(empty),
                           "--out", str(tmp_path / "out"), *SL_TINY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    check_one_line_error(proc.returncode, proc.stderr, ["empty.txt", "no prompts"])
    assert not (tmp_path / "out").exists()


def test_truncated_weights_as_a_real_command(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = copy_model(tiny_model_dir, tmp_path / "model")
    data = (model / "model.safetensors").read_bytes()
    write(model / "model.safetensors", data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-m", "minicai.generate", "--model", str(model), "--prompt", "hi",
                           "--max-new-tokens", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    check_one_line_error(proc.returncode, proc.stderr, ["model.safetensors"])


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    sys.path.insert(0, str(REPO))
    drive(sys.argv[2])
