"""The fast CPU path (minicai/fast.py) against the reference (minicai/model.py): the contract between them.

Values and gradients equal the reference's (float64), padding is not computed, the packed decoding weights and
the oneDNN products give the reference's outputs; and importing minicai changes nothing in the process (the malloc
setting is something a script turns on)."""

import argparse
import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import cached_hidden_states, left_padded_batch, make_hf_model

from minicai import fast
from minicai.model import Transformer, random_model, tiny_config
from minicai.run import add_common_args, load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NEEDS_BF16 = pytest.mark.skipif(not fast.ONEDNN_BF16, reason="this CPU has no oneDNN bf16 products (needs AVX512 "
                                                              "BW/VL/DQ or AVX-NE-CONVERT)")

SPY = textwrap.dedent("""
    import ctypes, json, sys
    import torch, numpy  # their own native libraries load before the spy
    opened = []
    class Spy(ctypes.CDLL):
        def __init__(self, name, *a, **k):
            opened.append(str(name))
            super().__init__(name, *a, **k)
    ctypes.CDLL = Spy
    import minicai, minicai.losses, minicai.model, minicai.sampling, minicai.fast  # noqa: E401
    before = list(opened)
    if sys.argv[1] == "call":
        minicai.fast.keep_freed_memory()
    if sys.argv[1].startswith("setup"):  # what a script does: run.setup with the common flags
        import argparse, minicai.run  # noqa: E401
        minicai.run.setup(argparse.Namespace(seed=0, device="cpu", dtype=None, threads=None,
                                             no_fast=sys.argv[1] == "setup-no-fast"))
    print(json.dumps({"on_import": before, "after": opened}))
""")


def _spy(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SPY, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_leaves_malloc_alone():
    """`import minicai` (and its rooms) opens no C library: mallopt is not called. The control: calling
    fast.keep_freed_memory does open libc (so the spy would see an import-time call)."""
    assert _spy("import")["on_import"] == []
    if sys.platform == "linux":
        assert "libc.so.6" in _spy("call")["after"]


def test_scripts_turn_the_malloc_setting_on_unless_no_fast():
    """run.setup (every script) applies fast.keep_freed_memory on the CPU; with --no-fast it leaves malloc alone."""
    assert _spy("setup-no-fast")["after"] == []
    if sys.platform == "linux":
        assert "libc.so.6" in _spy("setup")["after"]


# ---- the fast path against the reference -------------------------------------------------------------------------

OPENING = torch.tensor([7, 8, 9, 10, 11])


def pair(seed=5, dtype=torch.float64):
    """(reference, fast) with the same weights."""
    ref = random_model(tiny_config(vocab_size=97), seed=seed, dtype=dtype)
    return ref, fast.make_fast(copy.deepcopy(ref))


def test_make_fast_swaps_classes_keeps_parameters_and_only_on_the_cpu(tmp_path):
    ref, quick = pair()
    assert type(ref) is Transformer and isinstance(quick, fast.FastTransformer)
    assert ref.state_dict().keys() == quick.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), quick.state_dict().values()))
    quick.save_pretrained(tmp_path)  # checkpoints are the same files
    again = Transformer.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(again) is Transformer and torch.equal(again.lm_head.weight, ref.lm_head.weight)
    assert isinstance(Transformer.from_pretrained(tmp_path, fast=True), fast.FastTransformer)
    elsewhere = random_model(tiny_config()).to("meta")  # not the CPU: left as the reference
    assert type(fast.make_fast(elsewhere)) is Transformer


@pytest.mark.parametrize("prefix", [None, OPENING])
def test_fast_equals_reference_values_and_gradients(prefix):
    """FlatRows (real tokens only, the prefix once) gives the reference's hidden states at real positions and the
    same parameter gradients (float64), with and without a shared prefix."""
    ids, mask = left_padded_batch()
    results = []
    for model in pair():
        h = model.hidden_states(ids, mask, prefix=prefix)
        (h * mask[..., None]).pow(2).sum().backward()
        results.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h_ref, g_ref), (h_fast, g_fast) = results
    assert ((h_fast - h_ref).abs() * mask[..., None]).max().item() < 1e-12
    assert set(g_fast) == set(g_ref) and len(g_ref) > 10
    for name in g_ref:
        assert (g_fast[name] - g_ref[name]).abs().max().item() < 1e-10, name


def test_fast_cached_decoding_equals_reference_full_forward():
    """Prefill + one-token steps through the KV cache (one-query attention) give the reference's full forward."""
    ids, mask = left_padded_batch()
    ref, quick = pair(seed=3)
    with torch.no_grad():
        full = ref.hidden_states(ids, mask)
    assert ((cached_hidden_states(quick, ids, mask) - full).abs() * mask[..., None]).max().item() < 1e-12


def test_padding_is_not_computed():
    """A padded batch runs its real tokens only, as one sequence [1, n, D]; each row equals the row alone (float64),
    and a batch without padding keeps its [B, T] shape."""
    ids, mask = left_padded_batch()
    _, model = pair()
    seen = []
    model.model["layers"][0].input_layernorm.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        h = model.hidden_states(ids, mask)
        assert seen == [(1, int(mask.sum()), 32)]
        assert (h[~mask.bool()] == 0).all()
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            alone = model.hidden_states(ids[i : i + 1, real])
            assert (h[i, real] - alone[0]).abs().max() < 1e-12
        seen.clear()
        model.hidden_states(ids[:1], mask[:1])  # row 0 has no padding
        assert seen == [(1, ids.shape[1], 32)]
        seen.clear()
        model.hidden_states(ids[:, 9:], mask[:, 9:])  # no padding left in any row
        assert seen == [(3, 5, 32)]


def test_shared_prefix_runs_once_through_every_layer():
    """With a prefix of L tokens and B rows of T holding n real tokens, each layer sees one sequence of L + n tokens
    (the prefix once, no padding), and a prefix that changes changes every row (the rows really attend to it)."""
    ids, mask = left_padded_batch()
    B, T = ids.shape
    _, model = pair(dtype=torch.float32)
    seen = []
    model.model["layers"][1].input_layernorm.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        h = model.hidden_states(ids, mask, prefix=OPENING)
        other = model.hidden_states(ids, mask, prefix=torch.tensor([7, 8, 9, 10, 12]))
    n = int(mask.sum())
    assert n < B * T and seen[0] == (1, len(OPENING) + n, 32) and h.shape == (B, T, 32)
    assert (h[~mask.bool()] == 0).all()  # padding is not computed
    changed = ((h - other).abs().amax(-1) > 1e-4) | ~mask.bool()
    assert changed.all()


@pytest.mark.skipif(not fast.PACKED_DECODING, reason="this torch build has no oneDNN packed linear kernels")
def test_shared_prefix_with_packed_decoding_weights():
    """The prefix layout also runs on the packed decoding weights (what no-grad scoring uses) with the same result."""
    ids, mask = left_padded_batch()
    ref, model = pair(dtype=torch.float32)
    with torch.no_grad():
        plain = ref.hidden_states(ids, mask, prefix=OPENING)
        with model.decoding(batch=ids.numel()):
            packed = model.hidden_states(ids, mask, prefix=OPENING)
    assert ((packed - plain).abs() * mask[..., None]).max().item() < 1e-5


@pytest.mark.skipif(not fast.PACKED_DECODING, reason="this torch build has no oneDNN packed linear kernels")
@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied", "llama_tied_bias"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 0.05, marks=NEEDS_BF16)])
def test_packed_decoding_weights_give_the_reference_outputs(tmp_path, case, dtype, tol):
    """Inside FastTransformer.decoding the fused, packed weight copies give the reference's logits (prefill and
    cached steps), and leaving the block frees them."""
    path = make_hf_model(tmp_path, case)
    ref = Transformer.from_pretrained(path, dtype=dtype)
    model = Transformer.from_pretrained(path, dtype=dtype, fast=True)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = ref(ids, mask).float()
        with model.decoding(batch=ids.shape[0]):
            assert model.packed_head is not None and model.model["layers"][0].mlp.packed is not None
            packed = model(ids, mask).float()
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            steps = [model.logits(model.hidden_states(ids[:, :8], mask[:, :8], cache=cache))]
            for t in range(8, ids.shape[1]):
                steps.append(model.logits(model.hidden_states(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)))
    stepped = torch.cat(steps, dim=1).float()
    assert model.packed_head is None and all(b.self_attn.packed is None and b.mlp.packed is None
                                             for b in model.model["layers"])
    real = mask[..., None].bool()
    assert ((packed - plain).abs() * real).max().item() <= tol * plain.abs().max().item()
    assert ((stepped - plain).abs() * real).max().item() <= tol * plain.abs().max().item()


@pytest.mark.skipif(not fast.PACKED_DECODING, reason="this torch build has no oneDNN packed linear kernels")
@NEEDS_BF16
@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied", "llama_tied_bias"])
def test_packed_decoding_under_bf16_autocast_packs_bf16_copies_once(tmp_path, case):
    """Mixed precision (float32 weights, bf16 autocast; precision.py): decoding packs the weights cast to bf16 once,
    instead of autocast casting every weight at every product of every step, and gives the logits of autocast's own
    products (bf16 operands, bf16 results) to bf16 rounding; the float32 weights are left as they are."""
    path = make_hf_model(tmp_path, case)
    ref = Transformer.from_pretrained(path)
    model = Transformer.from_pretrained(path, fast=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = left_padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = ref(ids, mask).float()
        with model.decoding(batch=ids.shape[0]):
            packs = [model.packed_head, *model.model["layers"][0].self_attn.packed["qkv"],
                     model.model["layers"][0].mlp.packed["down"]]
            assert all(t is None or t.dtype == torch.bfloat16 for t in packs) and packs[0] is not None
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            steps = [model.logits(model.hidden_states(ids[:, :8], mask[:, :8], cache=cache))]
            for t in range(8, ids.shape[1]):
                steps.append(model.logits(model.hidden_states(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)))
    stepped = torch.cat(steps, dim=1)
    assert stepped.dtype == torch.bfloat16  # what autocast's products return
    real = mask[..., None].bool()
    assert ((stepped.float() - plain).abs() * real).max().item() <= 0.05 * plain.abs().max().item()
    assert model.packed_head is None and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied"])
def test_bf16_on_a_cpu_without_onednn_bf16_uses_plain_products(tmp_path, monkeypatch, case):
    """On a CPU whose oneDNN has no bf16 products (AVX2 only: packing a bf16 weight raises there), bf16 weights and
    bf16 autocast still run: decoding packs nothing, OneDNNLinear steps aside, and the fast model gives model.py's
    outputs (generation, a bf16-stored model's forward pass, and a training step's gradients under autocast)."""
    from minicai.sampling import generate

    monkeypatch.setattr(fast, "ONEDNN_BF16", False)
    monkeypatch.setattr(fast, "pack_weight", lambda *a: pytest.fail("a bf16 weight was packed"))
    path = make_hf_model(tmp_path, case)
    ref, model = Transformer.from_pretrained(path), Transformer.from_pretrained(path, fast=True)
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 20]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runs = [generate(m, prompts, 6, temperature=1.0, pad_id=0, seed=3) for m in (ref, model)]
        ids, mask = left_padded_batch()
        losses = [m(ids, mask).float().logsumexp(-1).mul(mask).sum() for m in (ref, model)]
    for loss in losses:
        loss.backward()
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].logprobs - runs[1].logprobs).abs().max().item() < 0.05
    assert abs(losses[0].item() - losses[1].item()) <= 0.01 * abs(losses[0].item())
    g_ref, g_fast = ref.model["layers"][0].mlp.down_proj.weight.grad, model.model["layers"][0].mlp.down_proj.weight.grad
    assert (g_fast - g_ref).abs().max().item() <= 0.05 * g_ref.abs().max().item()
    low_ref, low = ref.to(torch.bfloat16), model.to(torch.bfloat16)  # a model stored in bf16 (the PM when it scores)
    with torch.no_grad():
        a, b = low_ref(ids, mask).float(), low(ids, mask).float()
    assert ((a - b).abs() * mask[..., None]).max().item() <= 0.05 * a.abs().max().item()


def test_kv_cache_under_bf16_autocast_is_bf16_and_changes_no_number(monkeypatch):
    """Under bf16 autocast the fast model's KV cache holds bf16 keys and values (autocast's attention products
    read them in bf16 anyway): generation gives exactly the tokens and log-probs of a float32 cache."""
    from minicai.sampling import generate

    model = fast.make_fast(random_model(tiny_config(), seed=5)).requires_grad_(True)
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 20], [5, 6, 7, 30, 31, 32]]
    runs = []
    for low in (True, False):
        if not low:  # the float32 cache of model.py
            monkeypatch.setattr(fast.FastTransformer, "new_cache", Transformer.new_cache)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.new_cache(2, 4).k[0].dtype == (torch.bfloat16 if low else torch.float32)
            runs.append(generate(model, prompts, 12, temperature=1.0, pad_id=0, seed=3))
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert model.new_cache(2, 4).k[0].dtype == torch.float32  # without autocast: the model's dtype


@pytest.mark.skipif(not fast.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear kernel")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear_values_and_gradients(bias):
    """fast.OneDNNLinear (oneDNN forward, hand-written backward) gives F.linear's output and gradients (float32), for
    a non-contiguous 3-D input as the LM head gets it; and the same bits with and without autograd."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    quick = copy.deepcopy(layer)
    quick.__class__ = fast.OneDNNLinear
    x = torch.randn(3, 9, 48)[:, 2:].requires_grad_(True)  # [3, 7, 48], not contiguous
    upstream = torch.randn(3, 7, 40)
    grads = []
    for lin in (quick, layer):
        y = lin(x)
        (y * upstream).sum().backward()
        grads.append([y.detach()] + [t.grad.clone() for t in (x, lin.weight, lin.bias) if t is not None])
        x.grad = None
    for ours, ref in zip(*grads):
        assert ours.shape == ref.shape and (ours - ref).abs().max().item() < 1e-5
    with torch.no_grad():
        assert torch.equal(quick(x), grads[0][0])
    assert torch.equal(F.linear(x, layer.weight, layer.bias), grads[1][0])


def test_packed_decoding_is_a_no_op_with_gradients_or_float64():
    for dtype, grad in [(torch.float64, False), (torch.float32, True)]:
        model = fast.make_fast(random_model(tiny_config(), seed=4, dtype=dtype))
        with torch.set_grad_enabled(grad), model.decoding(batch=2):
            assert model.packed_head is None and model.model["layers"][0].self_attn.packed is None


def test_no_fast_flag_loads_the_reference(tiny_model_dir):
    """The scripts' --no-fast: run.load_model_and_tokenizer(fast=False) gives model.py's Transformer itself."""
    p = argparse.ArgumentParser()
    add_common_args(p, "runs/x")
    assert p.parse_args(["--no-fast"]).no_fast and not p.parse_args([]).no_fast
    model, _, _ = load_model_and_tokenizer(str(tiny_model_dir), "cpu", torch.float32, fast=False)
    assert type(model) is Transformer
    model, _, _ = load_model_and_tokenizer(str(tiny_model_dir), "cpu", torch.float32)
    assert isinstance(model, fast.FastTransformer)
