"""The reference transformer (model.py): the same logits as transformers' implementation; checkpoint.py: loading is
strict, saving round-trips, damaged files are named. (fast.py is held to this model in test_fast.py.)"""

import json
from pathlib import Path

import pytest
import torch

from minicai import MinicaiError
from minicai.checkpoint import config_from_hf
from minicai.model import Transformer, random_model, tiny_config

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


@torch.no_grad()
def cached_hidden_states(model, ids, mask, prefill: int = 8):
    """The hidden states of a batch decoded through the preallocated KV cache: its first `prefill` columns in one
    pass, then one column per pass, concatenated: [B, T], [B, T] -> [B, T, H]."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model.hidden_states(ids[:, :prefill], mask[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        steps.append(model.hidden_states(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache))
    return torch.cat(steps, dim=1)


def test_kv_cache_decoding_equals_full_forward():
    """Prefill + one-token steps through the preallocated cache give the full forward's hidden states."""
    model = random_model(tiny_config(vocab_size=97), seed=3, dtype=torch.float64)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = model.hidden_states(ids, mask)
    stepped = cached_hidden_states(model, ids, mask)
    assert ((stepped - full).abs() * mask[..., None]).max().item() < 1e-12


def test_kv_cache_repeat_rows_continues_each_row_several_ways():
    """A prompt cache forked K ways (row i * K + k continues row i) gives each continuation the hidden states of
    the prompt and that continuation run whole (float64), and the original cache is left as it was."""
    model = random_model(tiny_config(vocab_size=97), seed=3, dtype=torch.float64)
    ids, mask = left_padded_batch()
    options = torch.tensor([[5, 6], [7, 8]])  # K = 2 continuations of 2 tokens
    B, T, K = ids.shape[0], ids.shape[1], options.shape[0]
    with torch.no_grad():
        cache = model.new_cache(B, T)
        model.hidden_states(ids, mask, cache=cache)
        kept = [t.clone() for t in cache.k]
        fork = cache.repeat_rows(K, T + 2)
        forked = model.hidden_states(options.repeat(B, 1), torch.ones(B * K, 2, dtype=torch.long), cache=fork)
        for i in range(B):
            for k in range(K):
                whole = model.hidden_states(torch.cat([ids[i], options[k]])[None],
                                            torch.cat([mask[i], torch.ones(2, dtype=mask.dtype)])[None])
                assert (forked[i * K + k] - whole[0, T:]).abs().max().item() < 1e-12
    assert fork.length == T + 2 and cache.length == T and all(torch.equal(a, b) for a, b in zip(kept, cache.k))


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
    hub = config_from_hf({**base, "rope_theta": 100000.0})
    v5 = config_from_hf({**base, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
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


def model_with_edited_weights(tmp_path, edit) -> Path:
    """A tiny HF-layout model whose model.safetensors holds its weights after edit(state) (in place)."""
    from safetensors.torch import load_file, save_file

    path = make_hf_model(tmp_path, "llama_untied")
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")
    return path


def test_missing_tensor_is_named(tmp_path):
    path = model_with_edited_weights(tmp_path, lambda state: state.pop("model.norm.weight"))
    with pytest.raises(MinicaiError, match="missing tensor.*model.norm.weight"):
        Transformer.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = model_with_edited_weights(tmp_path, lambda state: state.update(
        {"model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}))
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


def _sharded(path):
    """Split the model.safetensors of `path` into two shards with an index; returns the index dict."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, path / file)
    (path / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_names_the_file_and_the_fix(tmp_path, damage):
    """A cut-short or garbage model.safetensors is a user error naming the file, not safetensors' traceback."""
    path = make_hf_model(tmp_path, "llama_untied")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 50,
                      "empty": b""}[damage])
    with pytest.raises(MinicaiError, match=r"model\.safetensors: not a readable safetensors file.*Fix: re-download"):
        Transformer.from_pretrained(path)


def test_truncated_shard_is_named(tmp_path):
    path = make_hf_model(tmp_path, "llama_untied")
    _sharded(path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MinicaiError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors"):
        Transformer.from_pretrained(path)


@pytest.mark.parametrize("shard,message", [
    ("model-00009-of-00009.safetensors", r"index\.json: shard 'model-00009-of-00009\.safetensors' is missing"),
    ("../outside.safetensors", r"index\.json: shard '\.\./outside\.safetensors' lies outside"),
    ("/etc/passwd", r"index\.json: shard '/etc/passwd' lies outside"),
])
def test_shard_index_pointing_at_a_missing_or_outside_file(tmp_path, shard, message):
    path = make_hf_model(tmp_path / "m", "llama_untied")
    index = _sharded(path)
    (tmp_path / "outside.safetensors").write_bytes((path / "model-00001-of-00002.safetensors").read_bytes())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MinicaiError, match=message):
        Transformer.from_pretrained(path)


def test_shard_index_that_is_not_json_or_has_no_weight_map(tmp_path):
    path = make_hf_model(tmp_path, "llama_untied")
    _sharded(path)
    index = path / "model.safetensors.index.json"
    index.write_text("{\n  oops")
    with pytest.raises(MinicaiError, match=r"index\.json:2: invalid JSON"):
        Transformer.from_pretrained(path)
    index.write_text("{}")
    with pytest.raises(MinicaiError, match=r"index\.json: no 'weight_map'"):
        Transformer.from_pretrained(path)


# ---- the tiny model for stepping through ---------------------------------------------------------------------------

def test_tiny_model_command_makes_a_small_model_with_the_default_tokenizer(tmp_path):
    """`python -m minicai.weights --tiny DIR`: a random 2-layer model with the default model's tokenizer and chat
    template, small enough that every stage runs on it in seconds (README: "Stepping through in seconds")."""
    from minicai import weights
    from minicai.sampling import generate
    from minicai.tokenizer import ChatTokenizer

    default = weights.cache_dir() / "models" / weights.DEFAULT_MODEL_NAME
    if not (default / "config.json").is_file():
        pytest.skip("the default model is not in the cache (python -m minicai.weights fetches it once)")
    assert weights.main(["--tiny", str(tmp_path / "tiny")]) == 0
    model = Transformer.from_pretrained(tmp_path / "tiny")
    tok, ref = ChatTokenizer.from_dir(tmp_path / "tiny"), ChatTokenizer.from_dir(default)
    assert model.config.num_layers == 2 and sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.vocab_size == ref.vocab_size == tok.vocab_size
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.render(chat, add_generation_prompt=True) == ref.render(chat, add_generation_prompt=True)
    gen = generate(model, [tok.render(chat, add_generation_prompt=True)], 3, temperature=0, stop_ids=(),
                   pad_id=tok.pad_id)
    assert gen.tokens.shape == (1, 3)
    assert oct((tmp_path / "tiny" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
