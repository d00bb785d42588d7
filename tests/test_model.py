"""The transformer: the same logits as transformers' reference implementation, loading is strict, saving round-trips."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from minicai import MinicaiError
from minicai.model import ONEDNN_LINEAR, PACKED_DECODING, ModelConfig, Transformer, linear, random_model, tiny_config

transformers = pytest.importorskip("transformers")

CASES = {
    # name: (config class, extra kwargs): GQA everywhere; tied and untied heads; Qwen2's q/k/v bias; Llama's bias
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama_tied_bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
}


def make_hf_model(tmp_path, case: str, seed: int = 0):
    cls_name, extra = CASES[case]
    cfg = getattr(transformers, cls_name)(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases start at zero in transformers; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def left_padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_logits_match_transformers(tmp_path, case, dtype, tol):
    path = make_hf_model(tmp_path, case)
    ours = Transformer.from_pretrained(path, dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a = ours(ids, mask)
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert a.dtype == dtype
    # Compare real positions only (what padding positions hold is unspecified). transformers computes its RoPE
    # tables in float32 even for float64 models, so in float64 the gap is float32 rounding of cos/sin (~1e-7).
    diff = ((a - b).abs() * mask[..., None]).max().item()
    assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_left_padded_rows_equal_rows_alone(dtype, tol):
    model = random_model(tiny_config(vocab_size=97), seed=1, dtype=dtype)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        batch = model(ids, mask)
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            alone = model(ids[i : i + 1, real])[0]
            assert (batch[i, real] - alone).abs().max().item() <= tol


def test_bfloat16_runs_and_stays_close():
    model = random_model(tiny_config(), seed=2)
    ids, mask = left_padded_batch()
    ids = ids.clamp(max=127)
    with torch.no_grad():
        ref = model(ids, mask)
        bf = model.to(torch.bfloat16)(ids, mask)
    assert bf.dtype == torch.bfloat16
    assert torch.isfinite(bf.float()).all()
    assert ((bf.float() - ref) * mask[..., None]).abs().max().item() < 0.05


def test_kv_cache_decoding_equals_full_forward():
    """Prefill + one-token steps through the preallocated cache give the full forward's hidden states."""
    model = random_model(tiny_config(vocab_size=97), seed=3, dtype=torch.float64)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = model.hidden_states(ids, mask)
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        steps = [model.hidden_states(ids[:, :8], mask[:, :8], cache=cache)]
        for t in range(8, ids.shape[1]):
            steps.append(model.hidden_states(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache))
    stepped = torch.cat(steps, dim=1)
    assert ((stepped - full).abs() * mask[..., None]).max().item() < 1e-12


def test_shared_prefix_equals_the_whole_sequence_values_and_gradients():
    """hidden_states(rows, prefix=opening) equals running [opening | row] for each left-padded row, and the
    parameter gradients equal those of the whole batch (float64), although the opening is computed only once."""
    ids, mask = left_padded_batch()
    opening = torch.tensor([7, 8, 9, 10, 11])
    whole_ids = torch.cat([opening.expand(ids.shape[0], -1), ids], dim=1)
    whole_mask = torch.cat([torch.ones(ids.shape[0], len(opening), dtype=mask.dtype), mask], dim=1)
    grads = []
    for shared in (False, True):
        model = random_model(tiny_config(vocab_size=97), seed=5, dtype=torch.float64)
        if shared:
            h = model.hidden_states(ids, mask, prefix=opening)
        else:
            h = model.hidden_states(whole_ids, whole_mask)[:, len(opening):]
        out = (h * mask[..., None]).pow(2).sum()
        out.backward()
        grads.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (h_whole, g_whole), (h_shared, g_shared) = grads
    assert ((h_shared - h_whole).abs() * mask[..., None]).max().item() < 1e-12
    assert set(g_shared) == set(g_whole) and len(g_whole) > 10
    for name in g_whole:
        assert (g_shared[name] - g_whole[name]).abs().max().item() < 1e-10, name


def test_padding_is_not_computed():
    """A padded batch runs its real tokens only, as one sequence [1, n, D]; each row equals the row alone (float64),
    and a batch without padding keeps its [B, T] shape."""
    ids, mask = left_padded_batch()
    model = random_model(tiny_config(vocab_size=97), seed=5, dtype=torch.float64)
    seen = []
    model.model["layers"][0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
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
    opening = torch.tensor([7, 8, 9, 10, 11])
    model = random_model(tiny_config(vocab_size=97), seed=5)
    seen = []
    model.model["layers"][1].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        h = model.hidden_states(ids, mask, prefix=opening)
        other = model.hidden_states(ids, mask, prefix=torch.tensor([7, 8, 9, 10, 12]))
    n = int(mask.sum())
    assert n < B * T and seen[0] == (1, len(opening) + n, 32) and h.shape == (B, T, 32)
    assert (h[~mask.bool()] == 0).all()  # padding is not computed
    changed = ((h - other).abs().amax(-1) > 1e-4) | ~mask.bool()
    assert changed.all()


@pytest.mark.skipif(not PACKED_DECODING, reason="this torch build has no oneDNN packed linear kernels")
def test_shared_prefix_with_packed_decoding_weights():
    """The prefix layout also runs on the packed decoding weights (what no-grad scoring uses) with the same result."""
    ids, mask = left_padded_batch()
    opening = torch.tensor([7, 8, 9, 10, 11])
    model = random_model(tiny_config(vocab_size=97), seed=5)
    with torch.no_grad():
        plain = model.hidden_states(ids, mask, prefix=opening)
        with model.decoding(batch=ids.numel()):
            packed = model.hidden_states(ids, mask, prefix=opening)
    assert ((packed - plain).abs() * mask[..., None]).max().item() < 1e-5


@pytest.mark.skipif(not PACKED_DECODING, reason="this torch build has no oneDNN packed linear kernels")
@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied", "llama_tied_bias"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_decoding_weights_give_the_same_outputs(tmp_path, case, dtype, tol):
    """Inside Transformer.decoding the fused, packed weight copies give the plain forward's logits (prefill and
    cached steps), and leaving the block frees them."""
    model = Transformer.from_pretrained(make_hf_model(tmp_path, case), dtype=dtype)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = model(ids, mask).float()
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


@pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear kernel")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear_values_and_gradients(bias):
    """model.linear (oneDNN forward, hand-written backward) gives F.linear's output and gradients (float32), for a
    non-contiguous 3-D input as the LM head gets it; and the same bits with and without autograd."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    x = torch.randn(3, 9, 48)[:, 2:].requires_grad_(True)  # [3, 7, 48], not contiguous
    upstream = torch.randn(3, 7, 40)
    grads = []
    for fn in (lambda: linear(layer, x), lambda: F.linear(x, layer.weight, layer.bias)):
        y = fn()
        (y * upstream).sum().backward()
        grads.append([y.detach()] + [t.grad.clone() for t in (x, layer.weight, layer.bias) if t is not None])
        for t in (x, layer.weight, layer.bias):
            if t is not None:
                t.grad = None
    for ours, ref in zip(*grads):
        assert ours.shape == ref.shape and (ours - ref).abs().max().item() < 1e-5
    with torch.no_grad():
        assert torch.equal(linear(layer, x), grads[0][0])


def test_packed_decoding_is_a_no_op_with_gradients_or_float64():
    for dtype, grad in [(torch.float64, False), (torch.float32, True)]:
        model = random_model(tiny_config(), seed=4, dtype=dtype)
        with torch.set_grad_enabled(grad), model.decoding(batch=2):
            assert model.packed_head is None and model.model["layers"][0].self_attn.packed is None


@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied"])
def test_save_pretrained_round_trips_and_loads_in_transformers(tmp_path, case):
    src = make_hf_model(tmp_path / "src", case)
    ours = Transformer.from_pretrained(src)
    ours.save_pretrained(tmp_path / "out")
    again = Transformer.from_pretrained(tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a, b, c = ours(ids, mask), again(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert ((a - c).abs() * mask[..., None]).max().item() < 1e-4


def test_config_reads_hub_and_transformers5_styles():
    base = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
                intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    hub = ModelConfig.from_hf({**base, "rope_theta": 100000.0})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert hub.rope_theta == v5.rope_theta == 100000.0
    assert hub.head_dim == 4 and hub.num_kv_heads == 2  # head_dim absent -> hidden / heads; no KV key -> MHA


# ---- bad input: each a clear error that names the problem ------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(MinicaiError, match="model directory not found"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_missing_config_key(tmp_path):
    path = make_hf_model(tmp_path, "llama_untied")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinicaiError, match="missing required key 'hidden_size'"):
        Transformer.from_pretrained(path)


def test_unknown_architecture_lists_supported(tmp_path):
    path = make_hf_model(tmp_path, "llama_untied")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinicaiError, match=r"unsupported model_type='gpt2'.*llama \(LlamaForCausalLM\), qwen2"):
        Transformer.from_pretrained(path)


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    path = make_hf_model(tmp_path, "llama_untied")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinicaiError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        Transformer.from_pretrained(path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_hf_model(tmp_path, "llama_untied")
    state = load_file(path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(MinicaiError, match="missing tensor.*model.norm.weight"):
        Transformer.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_hf_model(tmp_path, "llama_untied")
    state = load_file(path / "model.safetensors")
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, path / "model.safetensors")
    with pytest.raises(MinicaiError, match="unexpected tensor 'model.layers.7.mlp.up_proj.weight'"):
        Transformer.from_pretrained(path)


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_hf_model(tmp_path, "llama_untied")
    state = load_file(path / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / file)
    (path / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = Transformer.from_pretrained(path)
    assert torch.equal(model.model["norm"].weight, state["model.norm.weight"])
