"""The checker against verl 0.9.1's own PPO functions (opt in: python3 -m pytest -m slow tests/test_oracle_verl.py).
verl's trainer needs Ray, so the dump is built from its published functions (minicai/oracle/verl_ppo.py). The
package comes from VERL_ROOT (a directory holding verl/), or is fetched with `pip install --no-deps --target`."""

import pytest
from conftest import framework_dump

from minicai.oracle import check as C

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verl_dump(tmp_path_factory, request):
    return framework_dump(request, tmp_path_factory, "verl_ppo", "VERL_ROOT", "verl", "0.9.1")


def test_verl_dump_passes_under_verl(verl_dump):
    rep = C.check_file(verl_dump)
    assert rep.convention == "verl" and rep.clean, rep.text()


def test_verl_dump_under_minicai_explains_skip_gae_dual_clip_and_kl_name(verl_dump):
    rep = C.check_file(verl_dump, convention="minicai")
    assert rep.ok, rep.text()
    assert rep.explained() == {"kl": "by verl (kl_names: no 'low_var_kl' -> 'low_var_kl' = k3)",
                               "advantages_raw": "by verl (gae_hole: 'end' -> 'skip')",
                               "returns": "by verl (gae_hole: 'end' -> 'skip')",
                               "pg_loss": "by verl (dual_clip: None -> 3.0)"}, rep.text()


def test_verl_loss_normaliser_bug_is_named(verl_dump, tmp_path):
    tensors, meta = C.load_dump(verl_dump)
    tensors["pg_loss"] = tensors["pg_loss"] * 2  # e.g. divided by half the tokens
    C.write_dump(tmp_path / "bug.safetensors", tensors, meta)
    rep = C.check_file(tmp_path / "bug.safetensors")
    assert rep.first.quantity == "pg_loss" and "aggregation" in rep.cause, rep.text()
