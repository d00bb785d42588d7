"""GRPO / RLOO in RL-CAI (minicai/ppo.py group_*, grpo_step; train_rl.py --advantage grpo|rloo): group advantages,
loss aggregation, the exact first step, learning, the script end to end."""

import math

import pytest
import torch

from minicai import losses as L


def loop_group_advantages(scores: list[list[float]], baseline: str, scale: str, eps: float) -> list[list[float]]:
    """The definition, one group and one sample at a time in Python floats (float64)."""
    out = []
    for row in scores:
        G = len(row)
        if len(set(row)) == 1:  # all equal: no signal
            out.append([0.0] * G)
            continue
        mean = sum(row) / G
        if baseline == "mean":
            base = [mean] * G
        else:
            base = [sum(row[j] for j in range(G) if j != i) / (G - 1) for i in range(G)]
        if scale == "none":
            out.append([s - b for s, b in zip(row, base)])
            continue
        sd = math.sqrt(sum((s - mean) ** 2 for s in row) / (G - 1 if scale == "std" else G))
        out.append([(s - b) / (sd + eps) for s, b in zip(row, base)])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("baseline,scale", [("mean", "std"), ("mean", "std_biased"), ("mean", "none"),
                                            ("leave_one_out", "none"), ("leave_one_out", "std")])
def test_group_advantages_equal_a_plain_loop(baseline, scale, dtype):
    """Random groups of G = 2..8, and groups whose rewards are all equal (any value: 0.1, 1/3, -2.7 are not sums of
    powers of two, so the group mean is rounded): those get advantage exactly 0, never nan."""
    g = torch.Generator().manual_seed(0)
    for G in (2, 3, 4, 5, 8):
        s = (torch.randn(6, G, generator=g, dtype=torch.float64) * 3).to(dtype)
        for i, v in enumerate((0.1, 1 / 3, -2.7)):
            s[2 * i] = v  # rows 0, 2, 4: all equal
        got = L.group_advantages(s, baseline, scale, eps=1e-6)
        want = torch.tensor(loop_group_advantages(s.double().tolist(), baseline, scale, 1e-6), dtype=torch.float64)
        assert got.dtype == dtype and not got.isnan().any()
        assert torch.equal(got[[0, 2, 4]], torch.zeros(3, G, dtype=dtype)), (G, got[[0, 2, 4]])
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (G, got, want)
    # the baselines differ as they should: RLOO = G / (G - 1) * (s - mean)
    s = torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64)
    assert torch.allclose(L.group_advantages(s, "leave_one_out", "none"), 1.5 * L.group_advantages(s, "mean", "none"))
