"""The sampler: greedy decoding equals transformers', seeds reproduce, stops are honoured, log-probs are exact
(on model.py's reference path and on fast.py's CPU path)."""

import pytest
import torch

from minicai.fast import make_fast
from minicai.model import random_model, tiny_config
from minicai.model import shared_prefix_length
from minicai.sampling import filter_logits, generate, pad_rows, response_ids, sample_categorical

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23]]


def peaky_model(dtype=torch.float32):
    """Random weights scaled up, so the logits have clear winners and greedy paths are well defined."""
    model = random_model(tiny_config(vocab_size=97), seed=4, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(25)
    return model


@pytest.mark.parametrize("fast", [False, True])
def test_greedy_equals_transformers_generate(tmp_path, fast):
    model = peaky_model()
    model.save_pretrained(tmp_path)
    model = make_fast(model) if fast else model
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    gen = generate(model, PROMPTS, max_new_tokens=20, temperature=0, pad_id=0)
    for i, prompt in enumerate(PROMPTS):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert gen.tokens[i].tolist() == out[0, len(prompt):].tolist()


def test_same_seed_same_output_different_seed_different():
    model = random_model(tiny_config(vocab_size=97), seed=5)
    a = generate(model, PROMPTS, 16, temperature=1.0, seed=7)
    b = generate(model, PROMPTS, 16, temperature=1.0, seed=7)
    c = generate(model, PROMPTS, 16, temperature=1.0, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (1.0, 0, 0.9)])
def test_logprobs_equal_a_reforward_of_the_full_sequence(temperature, top_k, top_p, fast):
    model = random_model(tiny_config(vocab_size=97), seed=6, dtype=torch.float64)
    model = make_fast(model) if fast else model
    gen = generate(model, PROMPTS, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    for i, prompt in enumerate(PROMPTS):
        new = gen.tokens[i][gen.mask[i].bool()]
        full = torch.tensor([prompt + new.tolist()])
        with torch.no_grad():
            logits = model(full)[0, len(prompt) - 1 : -1]
        logp = filter_logits(logits, temperature, top_k, top_p).log_softmax(-1)
        expected = logp.gather(-1, new[:, None]).squeeze(-1)
        assert torch.allclose(gen.logprobs[i][: len(new)], expected.float(), atol=1e-5)
        assert torch.isfinite(gen.logprobs[i]).all()


def test_stop_ids_end_rows_and_are_kept_in_the_mask():
    model = peaky_model()
    free = generate(model, PROMPTS, 12, temperature=0)
    stop = free.tokens[0, 3].item()  # row 0 emits this token at step 3 (maybe earlier too)
    gen = generate(model, PROMPTS, 12, temperature=0, stop_ids=[stop], pad_id=0)
    for i in range(len(PROMPTS)):
        row = free.tokens[i].tolist()
        n = row.index(stop) + 1 if stop in row else len(row)
        assert gen.mask[i].sum().item() == n
        assert gen.tokens[i, :n].tolist() == row[:n]
        assert (gen.tokens[i, n:] == 0).all() and (gen.logprobs[i, n:] == 0).all()
        assert bool(gen.finished[i]) == (stop in row)
        assert response_ids(gen, i, [stop]) == row[: n - 1 if stop in row else n]


def test_batch_equals_each_prompt_alone():
    model = random_model(tiny_config(vocab_size=97), seed=9, dtype=torch.float64)
    batch = generate(model, PROMPTS, 10, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 10, temperature=0)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-6)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every prompt keeps a token of its own
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_gives_what_each_full_prompt_gives(temperature):
    """Prompts with a common opening: computing it once (share_prefix) changes nothing but float rounding."""
    model = random_model(tiny_config(vocab_size=97), seed=9, dtype=torch.float64)
    prompts = [[1, 2, 3, 4, 5] + p for p in PROMPTS]
    shared = generate(model, prompts, 10, temperature=temperature, seed=5)
    whole = generate(model, prompts, 10, temperature=temperature, seed=5, share_prefix=False)
    assert torch.equal(shared.tokens, whole.tokens) and torch.equal(shared.mask, whole.mask)
    assert (shared.logprobs - whole.logprobs).abs().max() < 1e-12
    if temperature == 0:  # and each greedy row equals its prompt run alone
        for i, prompt in enumerate(prompts):
            assert shared.tokens[i].tolist() == generate(model, [prompt], 10, temperature=0).tokens[0].tolist()


def test_sample_categorical_draws_from_the_distribution():
    """Inverse-CDF sampling: frequencies match the probabilities, zero-probability tokens never come up, seeded."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.25, 0.05]).repeat(4000, 1)  # 4000 rows, one draw each
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    expected = probs[0].double() * len(draws)
    assert counts[1] == 0 and counts[3] == 0
    nonzero = expected > 0
    chi2 = float(((counts - expected)[nonzero] ** 2 / expected[nonzero]).sum())
    assert chi2 < 16.3, f"chi-square {chi2:.1f} with 3 degrees of freedom (p < 0.001)"
    again = sample_categorical(probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # a point mass at the last token (the boundary case of the search) is drawn every time
    last = torch.zeros(10, 6)
    last[:, -1] = 1.0
    assert sample_categorical(last, torch.Generator().manual_seed(1)).eq(5).all()


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, top_k=2)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, 1.0, top_p=0.8)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.1)[0]).tolist() == [True, False, False, False]


def test_pad_rows_by_hand():
    """The one padder: left puts every row's end in the last column, right every row's start in column 0."""
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    for bad in ({"rows": [[1]], "side": "middle"}, {"rows": [], "side": "left"}):
        with pytest.raises(ValueError):
            pad_rows(pad_id=0, **bad)


def test_generate_rejects_empty_prompts():
    with pytest.raises(ValueError, match="non-empty"):
        generate(peaky_model(), [[1, 2], []], max_new_tokens=2, temperature=0, pad_id=0)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_fast_nucleus_equals_the_full_sort(top_p, scale):
    """The shortlist shortcut keeps exactly the tokens the textbook full-sort nucleus keeps (flat and peaky rows)."""
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    expected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    got = torch.isfinite(filter_logits(logits, 1.0, top_p=top_p))
    assert torch.equal(got, expected)
