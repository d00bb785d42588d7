"""Crashes lose nothing (issue 15): a run killed with SIGKILL and run again ends bit-identical to a run never
killed; a rerun with other settings stops instead of building on the old outputs; two writers of one run folder
and a full disk are clear errors that leave no partial file.

The kill is a test hook (MINICAI_TEST_KILL="train_pm.py:3", minicai.data.crash_point): that script SIGKILLs itself
in the middle of its 3rd appended JSONL line, half of it written, as a power cut would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Outputs that must come back identical byte for byte (the rest hold times, or paths of the run folder).
SAME_BYTES = ["sl/revisions.jsonl", "sl/helpful.jsonl", "sl/model/model.safetensors", "pm/pairs.jsonl",
              "pm/labels.jsonl", "pm/model/model.safetensors", "pm/model/reward_head.safetensors",
              "rl/model/model.safetensors", "rl/samples.jsonl", "report/judgments.jsonl"]
# The evaluation's responses are keyed by the model folder's absolute path (being fixed on another branch): compare
# them without their key.
SAME_RECORDS = ["report/responses.jsonl"]


def pipeline(out: Path, model: Path, stages: str = "sl,pm,rl,eval", kill: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "MINICAI_TEST_KILL"}
    env.update(OMP_NUM_THREADS="1", **({"MINICAI_TEST_KILL": kill} if kill else {}))
    return subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--tiny", "--model", str(model), "--out",
                           str(out), "--threads", "1", "--stages", stages], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def outputs(out: Path, stages: str) -> dict[str, object]:
    names = [n for n in SAME_BYTES + SAME_RECORDS if n.split("/")[0] in stages.replace("eval", "report")]
    found = {}
    for name in names:
        path = out / name
        if name in SAME_RECORDS:
            found[name] = sorted(json.dumps({k: v for k, v in json.loads(line).items() if k not in ("key", "model_dir")},
                                            sort_keys=True) for line in path.read_text().splitlines())
        else:
            found[name] = path.read_bytes()
    return found


def killed_then_rerun(tmp_path: Path, model: Path, kill: str, stages: str) -> dict:
    out = tmp_path / f"killed-{kill.replace(':', '-')}"
    first = pipeline(out, model, stages, kill)
    assert first.returncode != 0, f"{kill}: the kill point was never reached\n{first.stderr[-2000:]}"
    second = pipeline(out, model, stages)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    return outputs(out, stages)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted tiny pipeline: {stages: outputs}, computed once per stage list."""
    cache = {}

    def get(stages: str) -> dict:
        if stages not in cache:
            out = tmp_path_factory.mktemp("reference") / "runs"
            proc = pipeline(out, tiny_model_dir, stages)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[stages] = outputs(out, stages)
        return cache[stages]
    return get


def test_kill_during_rl_then_rerun_is_bit_identical(reference, tmp_path, tiny_model_dir):
    """Fast variant (CI): SIGKILL in the second PPO iteration (after the first one's checkpoint); the rerun resumes
    from that checkpoint and ends with the same SL, PM and RL outputs as a run never killed."""
    stages = "sl,pm,rl"
    assert killed_then_rerun(tmp_path, tiny_model_dir, "train_rl.py:5", stages) == reference(stages)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["train_sl.py:1", "train_sl.py:6", "train_pm.py:3", "train_pm.py:7",
                                  "train_rl.py:2", "train_rl.py:5", "pipeline.py:4", "pipeline.py:20"])
def test_kill_anywhere_then_rerun_is_bit_identical(reference, tmp_path, tiny_model_dir, kill):
    """8 moments, during SL (revisions, fine-tuning), PM (pairs, labels), RL (iteration 1, 2) and the evaluation
    (responses, judgments): every final output equals the uninterrupted run's."""
    stages = "sl,pm,rl,eval"
    assert killed_then_rerun(tmp_path, tiny_model_dir, kill, stages) == reference(stages)


# ---------------------------------------------------------------------------------------------------------------
# Settings recorded with the outputs


def sl_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train_sl.py"), "--model", str(model), "--out", str(out), "--only", "generate",
            "--num-prompts", "1", "--num-helpful", "0", "--rounds", "1", "--num-examples", "0",
            "--max-new-tokens", "2", "--threads", "1", *extra]


def run_cmd(argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MINICAI_TEST_KILL", None)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_other_settings_stop_the_rerun_and_history_is_kept(tmp_path, tiny_model_dir):
    out = tmp_path / "sl"
    assert run_cmd(sl_argv(tiny_model_dir, out)).returncode == 0
    revisions = (out / "revisions.jsonl").read_bytes()
    other = run_cmd(sl_argv(tiny_model_dir, out, "--rounds", "2"))
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1].startswith("error:")
    assert "--rounds: 1 -> 2" in other.stderr and "--force" in other.stderr and "another --out" in other.stderr
    assert (out / "revisions.jsonl").read_bytes() == revisions  # untouched
    # the same command again resumes; --force starts afresh under the new settings; every run is in the history
    assert run_cmd(sl_argv(tiny_model_dir, out)).returncode == 0
    assert run_cmd(sl_argv(tiny_model_dir, out, "--rounds", "2", "--force")).returncode == 0
    assert json.loads((out / "settings.json").read_text())["rounds"] == 2
    history = [json.loads(line) for line in (out / "args_history.jsonl").read_text().splitlines()]
    assert [h["args"]["rounds"] for h in history] == [1, 1, 2]  # the rejected run left no trace


def test_pipeline_does_not_reuse_a_stage_made_with_other_settings(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    assert pipeline(out, tiny_model_dir, "sl").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    again = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--tiny", "--model", str(tiny_model_dir),
                            "--out", str(out), "--stages", "sl", "--sl-args", "--steps 2"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "reusing" not in again.stdout
    assert "--steps: 1 -> 2" in again.stderr
    same = pipeline(out, tiny_model_dir, "sl")
    assert same.returncode == 0 and "reusing it" in same.stdout


def test_settings_ignore_where_the_checkout_and_runs_live(tmp_path):
    import argparse

    from minicai.data import REPO_ROOT
    from minicai.run import settings_differences, settings_of

    a = settings_of(argparse.Namespace(out=str(tmp_path / "a" / "rl"), model=str(tmp_path / "a" / "sl" / "model"),
                                       prompts=str(REPO_ROOT / "data" / "x.jsonl"), threads=4, lr=1e-5))
    b = settings_of(argparse.Namespace(out=str(tmp_path / "b" / "rl"), model=str(tmp_path / "b" / "sl" / "model"),
                                       prompts=str(REPO_ROOT / "data" / "x.jsonl"), threads=1, lr=1e-5))
    assert a == b and "threads" not in a and a["prompts"] == "<repo>/data/x.jsonl"
    assert settings_differences(a, {**b, "lr": 2e-5}) == ["--lr: 1e-05 -> 2e-05"]


# ---------------------------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_writer_stops_and_a_dead_writers_lock_is_taken_over(tmp_path, tiny_model_dir):
    out = tmp_path / "sl"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(f"{holder.pid}\n")
        second = run_cmd(sl_argv(tiny_model_dir, out))
        assert second.returncode == 2 and f"pid {holder.pid}" in second.stderr and "another --out" in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    taken = run_cmd(sl_argv(tiny_model_dir, out))  # the holder is dead now: its lock is stale
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert (out / "revisions.jsonl").is_file() and not (out / ".lock").exists()  # released at exit


def test_lock_in_process(tmp_path):
    from minicai import MinicaiError
    from minicai.run import LOCK_NAME, acquire_lock, release_lock

    acquire_lock(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    acquire_lock(tmp_path)  # the holder may take it again
    release_lock(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(f"{os.getppid()}\n")  # a live process
    with pytest.raises(MinicaiError, match=f"pid {os.getppid()}"):
        acquire_lock(tmp_path)
    (tmp_path / LOCK_NAME).write_text("")  # empty: a writer between open and write...
    with pytest.raises(MinicaiError, match="starting to write"):
        acquire_lock(tmp_path)
    os.utime(tmp_path / LOCK_NAME, (0, 0))  # ...or, long ago, one that died there: stale
    acquire_lock(tmp_path)
    release_lock(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Full disk, unwritable output folder


def test_output_folder_that_cannot_exist(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cmd(sl_argv(tiny_model_dir, blocker / "sl"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --out") and "writable" in proc.stderr


@pytest.mark.parametrize("where", ["settings.json", "model"])
def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, tiny_model_dir, monkeypatch, capsys, where):
    """os.replace raising ENOSPC when the run record (settings.json) or the trained model (model/) is put into
    place: exit 2, one `error:` line, no temporary file left, nothing half written."""
    import importlib.util

    from minicai import run

    spec = importlib.util.spec_from_file_location("_train_sl", REPO / "train_sl.py")
    train_sl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_sl)
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):
        if Path(dst).name == where:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    out = tmp_path / "sl"
    argv = sl_argv(tiny_model_dir, out)[2:]
    if where == "model":  # generate and train
        argv = [a for a in argv if a not in ("--only", "generate")] + ["--steps", "1", "--batch-size", "1",
                                                                      "--heldout", "0"]
    with pytest.raises(SystemExit) as exit_:
        run.cli_main(lambda: train_sl.main(argv))
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error:") and "No space left on device" in err[-1], err
    left = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not [n for n in left if n.startswith(".") and n != ".lock"], left  # no temporary files
    assert "model" not in left
    if where == "settings.json":
        assert left in ([], [".lock"])  # the rejected run left nothing (the folder it made is gone)
    run.release_lock(out)


def test_sigkill_lock_left_behind_does_not_block_the_rerun(tmp_path, tiny_model_dir):
    out = tmp_path / "sl"
    proc = subprocess.Popen(sl_argv(tiny_model_dir, out), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                         "MINICAI_TEST_KILL": "train_sl.py:1"})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert (out / ".lock").is_file()  # a killed process cannot clean up
    assert run_cmd(sl_argv(tiny_model_dir, out)).returncode == 0


def test_cli_main_leaves_argparse_as_it_was():
    import argparse

    from minicai.run import cli_main

    error = argparse.ArgumentParser.error
    with pytest.raises(SystemExit):
        cli_main(lambda: argparse.ArgumentParser().parse_args(["--nope"]))
    assert argparse.ArgumentParser.error is error
