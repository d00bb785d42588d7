"""run.config_from_args and the hyperparameter flags of the stage scripts: each default lives in one dataclass."""

import argparse
import dataclasses
import re
from pathlib import Path
from unittest import mock

import pytest
from conftest import load_script

from minicai.run import config_from_args

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_sl.py", "train_pm.py", "train_dpo.py", "train_rl.py")




def parser_of(script) -> argparse.ArgumentParser:
    """The ArgumentParser that script.parse_args builds (caught as it parses no flags)."""
    seen = []
    real = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", spy):
        script.parse_args([])
    return seen[0]


@dataclasses.dataclass
class Config:
    lr: float = 1e-3
    batch_size: int = 4
    max_len: int | None = None
    seed: int = 0


def test_config_from_args_takes_flags_by_field_name_then_overrides_then_defaults():
    args = argparse.Namespace(lr=0.5, batch_size=8, seed=3, unrelated="x")
    assert config_from_args(Config, args) == Config(lr=0.5, batch_size=8, max_len=None, seed=3)
    assert config_from_args(Config, args, seed=7, max_len=64) == Config(lr=0.5, batch_size=8, max_len=64, seed=7)
    pm = argparse.Namespace(pm_lr=0.25, pm_max_len=32, lr=9.0, seed=1)  # prefix: --pm-lr -> lr, never --lr
    assert config_from_args(Config, pm, prefix="pm_") == Config(lr=0.25, batch_size=4, max_len=32, seed=0)
    with pytest.raises(TypeError, match="no field"):
        config_from_args(Config, args, sede=1)  # a misspelt override is an error, not a silent default


def test_without_flags_every_script_builds_its_dataclass_defaults():
    """The argparse defaults come from the dataclasses: parsing no flags gives the dataclass defaults exactly
    (train_pm: its own CPU-sized PM preset, and FeedbackConfig with the default few-shot demos)."""
    sl, pm, dpo, rl = (load_script(name) for name in SCRIPTS)
    args = sl.parse_args([])
    assert sl.settings_from(args) == sl.CritiqueSettings()
    assert sl.sft_config_from(args) == sl.SFTConfig()
    args = pm.parse_args([])
    assert config_from_args(pm.PMTrainConfig, args, prefix="pm_", warmup_steps=args.pm_warmup, seed=args.seed) == pm.PM
    assert dataclasses.replace(pm.feedback_config(args), examples=[]) == pm.FeedbackConfig()  # + the demo file's
    assert dpo.dpo_config(dpo.parse_args([])) == dpo.DPOConfig()
    assert rl.ppo_config(rl.parse_args([])) == rl.PPOConfig()


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_states_the_default_each_flag_has(name):
    """A "(default: X)" written by hand in a flag's help must be the flag's real default (the number, however
    written: 2e-5 = 2e-05)."""
    parser = parser_of(load_script(name))
    checked = 0
    for action in parser._actions:
        if isinstance(action.default, bool) or not isinstance(action.default, (int, float)) or not action.help:
            continue
        text = action.help % {"default": action.default} if "%(" in action.help else action.help
        m = re.search(r"default: ([-+]?[0-9][0-9.e+-]*)\)", text)
        if m:
            assert float(m.group(1)) == action.default, (action.option_strings, text, action.default)
            checked += 1
    assert checked >= 5
