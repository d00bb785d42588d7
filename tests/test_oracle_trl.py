"""The checker against real code nobody here wrote: one iteration of TRL 1.12's PPO trainer on a tiny random model
(opt in: python3 -m pytest -m slow tests/test_oracle_trl.py; about 15 s, needs trl, transformers, datasets)."""

import pytest

from minicai.oracle import check as C

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def opt_in(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in slow test: run with -m slow")


@pytest.fixture(scope="module")
def trl_dump(tmp_path_factory, opt_in):
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.12.0":
        pytest.skip(f"written against trl 1.12.0, found {trl.__version__}")
    from minicai.oracle import trl_ppo

    path = tmp_path_factory.mktemp("trl") / "trl.safetensors"
    trl_ppo.run(path)
    return path


def test_trl_dump_passes_under_trl_ppo(trl_dump):
    rep = C.check_file(trl_dump)
    print(rep.text())
    assert rep.convention == "trl-ppo" and rep.tolerance == "fp32"
    assert rep.clean, rep.text()
    assert {r.quantity for r in rep.rows} >= {"old_logprobs", "kl", "token_rewards", "advantages_raw", "returns",
                                              "advantages", "pg_loss", "vf_loss", "entropy_tokens"}
    tensors, _ = C.load_dump(trl_dump)
    lengths = tensors["response_mask"].sum(1)
    assert (lengths < tensors["response_mask"].shape[1]).any(), "no row ended before the length limit"


def test_trl_dump_under_minicai_reports_exactly_the_documented_differences(trl_dump):
    rep = C.check_file(trl_dump, convention="minicai")
    print(rep.text())
    assert rep.ok, rep.text()
    explained = rep.explained()
    assert set(explained) == {"token_rewards", "advantages_raw", "returns", "vf_loss"}, rep.text()
    assert explained["token_rewards"] == "by trl-ppo (score_position: 'last_valid' -> 'after_last_valid')"
    assert explained["advantages_raw"] == "by trl-ppo (value_extra: 0 -> 1)"
    assert explained["vf_loss"] == "by trl-ppo (value_mask: 'valid' -> 'valid_p1')"


def test_a_score_moved_one_token_is_named(trl_dump, tmp_path):
    tensors, meta = C.load_dump(trl_dump)
    m = tensors["response_mask"]
    T = m.shape[1]
    rows = [b for b in range(m.shape[0]) if int(m[b].sum()) + 1 < T]  # TRL's slot (EOS + 1) has a slot after it
    assert rows, "no row ends two tokens before the limit"
    b = rows[0]
    slot = int(m[b].sum())  # TRL puts the score here, one past the last valid token
    r = tensors["token_rewards"].clone()
    r[b, slot + 1], r[b, slot] = r[b, slot].item(), r[b, slot + 1].item()
    tensors["token_rewards"] = r
    C.write_dump(tmp_path / "bug.safetensors", tensors, meta)
    rep = C.check_file(tmp_path / "bug.safetensors")
    print(rep.text())
    assert not rep.ok and rep.first.quantity == "token_rewards"
    assert f"row {b} differs only at t=[{slot}, {slot + 1}]" in rep.cause and "score" in rep.cause
    # and planted in the advantages instead (GAE run on rewards with the score one token late)
    tensors, meta = C.load_dump(trl_dump)
    from minicai.oracle import reference as R
    from minicai.oracle.conventions import get

    moved = tensors["token_rewards"].double().clone()
    moved[b, slot + 1], moved[b, slot] = moved[b, slot].item(), moved[b, slot + 1].item()
    adv, _ = R.advantages(get("trl-ppo"), moved, tensors["values"], m, meta["gamma"], meta["lam"])
    tensors["advantages_raw"] = adv.float()
    C.write_dump(tmp_path / "bug2.safetensors", tensors, meta)
    rep = C.check_file(tmp_path / "bug2.safetensors")
    assert rep.first.quantity == "advantages_raw" and "GAE" in rep.cause
