"""The checker against OpenRLHF 0.11.2's own PPO functions (opt in: python3 -m pytest -m slow
tests/test_oracle_openrlhf.py). OpenRLHF's trainer needs Ray, DeepSpeed and vLLM, so the dump is built from its
published functions (minicai/oracle/openrlhf_ppo.py). The package comes from OPENRLHF_ROOT (a directory holding
openrlhf/), or is fetched with `pip install --no-deps --target` (never touching torch)."""

import pytest
from conftest import framework_dump

from minicai.oracle import check as C

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orl_dump(tmp_path_factory, request):
    return framework_dump(request, tmp_path_factory, "openrlhf_ppo", "OPENRLHF_ROOT", "openrlhf", "0.11.2")


def test_openrlhf_dump_passes_under_openrlhf(orl_dump):
    rep = C.check_file(orl_dump)
    assert rep.convention == "openrlhf" and rep.clean, rep.text()


def test_openrlhf_dump_under_minicai_explains_score_clip_and_biased_whitening(orl_dump):
    rep = C.check_file(orl_dump, convention="minicai")
    assert rep.ok and rep.explained() == {"token_rewards": "by openrlhf (score_clip: None -> 10.0)",
                                          "advantages": "by openrlhf (whiten_var: 'unbiased' -> 'biased')"}, rep.text()
    assert any(ok == "EXPLAINED" and "advantages_outside" in note for _, ok, note in rep.invariants)


def test_openrlhf_score_one_token_early_is_named(orl_dump, tmp_path):
    tensors, meta = C.load_dump(orl_dump)
    m = tensors["response_mask"]
    b = next(b for b in range(m.shape[0]) if int(m[b].sum()) >= 2)
    last = int(m[b].sum()) - 1
    r = tensors["token_rewards"].clone()
    r[b, last - 1], r[b, last] = r[b, last].item(), r[b, last - 1].item()
    tensors["token_rewards"] = r
    C.write_dump(tmp_path / "bug.safetensors", tensors, meta)
    rep = C.check_file(tmp_path / "bug.safetensors")
    assert rep.first.quantity == "token_rewards" and f"t=[{last - 1}, {last}]" in rep.cause, rep.text()
