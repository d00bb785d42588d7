"""Spec for minicai/tokenizer.py: chat rendering equals transformers' apply_chat_template, and the assistant mask
covers exactly the assistant's words and end-of-turn tokens.

Tiny model directories are built in a tmp dir: a byte-level BPE trained with `tokenizers` on a few sentences plus
the real chat templates of SmolLM2 (ChatML), Qwen2.5 (ChatML, different default system) and Llama-3.0."""

import json
import os
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minicai import MinicaiError
from minicai.tokenizer import SUPPORTED_FORMATS, ChatTokenizer

# --- the models' own chat templates (as stored in their tokenizer_config.json) -----------------------------------

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (a fact of its tokenizer.json), reused for the tiny Qwen/Llama tokenizers.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "user\nHello there! How are you today?",
    "assistant\nI am fine, thank you. How can I help you?",
    "system\nAnswer briefly and honestly. Avoid harmful content.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me how to pick a lock. I can't help with breaking into property.",
    "héllo wörld, naïve café 12345 67 — ünïcödé ✓ 你好 🙂",
    "Paragraphs.\n\nNewlines merge into one token.\n\n\nAcross turns too.\n\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hello there! How are you today?"},
     {"role": "assistant", "content": "I am fine, thank you."},
     {"role": "user", "content": "Tell me how to pick a lock."},
     {"role": "assistant", "content": "I can't help with breaking into property."}],
    [{"role": "system", "content": "Be honest."},
     {"role": "user", "content": "héllo wörld ✓ 你好 🙂 e\u0301 12345"},  # e + combining accent: NFC in Qwen
     {"role": "assistant", "content": "  naïve café — ünïcödé!\n\n"}],
    [{"role": "user", "content": "\nleading newline, trailing spaces   "},
     {"role": "assistant", "content": "\n\nstarts with newlines"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "system prompt later"}, {"role": "system", "content": "A second system turn."},
     {"role": "assistant", "content": "OK"}],
]


def _train_bpe(specials: list[str], pre_tokenizer, normalizer=None, vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def _write_dir(d: Path, tok: Tokenizer, tokenizer_config: dict, extra: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    for name, content in (extra or {}).items():
        (d / name).write_text(json.dumps(content), encoding="utf-8")
    return d


def make_smollm2_dir(d: Path, template: str = SMOLLM2_TEMPLATE) -> Path:
    """Like SmolLM2-Instruct: GPT-2 byte-level BPE, <|im_end|> as eos and pad."""
    tok = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel(add_prefix_space=False))
    cfg = {"tokenizer_class": "GPT2Tokenizer", "chat_template": template, "bos_token": "<|im_start|>",
           "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
           "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    return _write_dir(d, tok, cfg)


def make_qwen25_dir(d: Path) -> Path:
    """Like Qwen2.5-Instruct: NFC + split regex + byte-level, eos <|im_end|>, pad <|endoftext|>, two eos ids."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre, normalizers.NFC())
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN25_TEMPLATE, "bos_token": None,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "clean_up_tokenization_spaces": False}
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    return _write_dir(d, tok, cfg, {"generation_config.json": {"eos_token_id": [im_end, eot],
                                                               "pad_token_id": eot}})


def make_llama3_dir(d: Path) -> Path:
    """Like Llama-3-Instruct: a post-processor that prepends <|begin_of_text|>, eos <|eot_id|>, no pad token."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _train_bpe(specials, pre)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE,
           "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True}
    return _write_dir(d, tok, cfg)


MAKERS = {"smollm2": make_smollm2_dir, "qwen25": make_qwen25_dir, "llama3": make_llama3_dir}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: make(root / name) for name, make in MAKERS.items()}


def hf_chat_ids(hf_tok, messages, add_generation_prompt) -> list[int]:
    """transformers' ids; v5 returns a BatchEncoding by default, v4 a plain list."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


# --- golden text: the rendered string, written out by hand ------------------------------------------------------

def test_chatml_text_injects_the_templates_default_system_message(model_dirs):
    tok = ChatTokenizer.from_dir(model_dirs["smollm2"])
    assert tok.format.name == "chatml" and tok.format.default_system == SMOLLM2_SYSTEM
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.render_prompt_text(msgs, add_generation_prompt=True) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_prompt_text(msgs) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    sys_msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}]
    assert tok.render_prompt_text(sys_msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")


def test_default_system_text_is_read_from_the_template(model_dirs, tmp_path):
    assert ChatTokenizer.from_dir(model_dirs["qwen25"]).format.default_system == QWEN25_SYSTEM
    other = SMOLLM2_TEMPLATE.replace(SMOLLM2_SYSTEM, "Don\\'t panic.")  # jinja-escaped quote in the literal
    assert ChatTokenizer.from_dir(make_smollm2_dir(tmp_path / "o", other)).format.default_system == "Don't panic."
    plain = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
             "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
             "{% endif %}")
    tok = ChatTokenizer.from_dir(make_smollm2_dir(tmp_path / "p", plain))
    assert tok.format.default_system is None
    assert tok.render_prompt_text([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n"


def test_llama3_text(model_dirs):
    tok = ChatTokenizer.from_dir(model_dirs["llama3"])
    assert tok.format.name == "llama3"
    msgs = [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "Yo"}]
    assert tok.render_prompt_text(msgs, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# --- parity with transformers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MAKERS))
def test_render_matches_transformers_apply_chat_template(model_dirs, name):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dirs[name]))
    tok = ChatTokenizer.from_dir(model_dirs[name])
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            assert tok.render_prompt_text(msgs, gen) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen), (name, msgs, gen)
            assert tok.render(msgs, gen) == hf_chat_ids(hf, msgs, gen), (name, msgs, gen)
    # Also plain text: no special tokens added (the llama3 dir has a BOS post-processor).
    text = CORPUS[-1]
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = tok.render(CONVERSATIONS[3])
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_chat_template_jinja_file_is_used(model_dirs, tmp_path):
    """transformers >= 4.50 saves the template as chat_template.jinja; it wins over tokenizer_config.json."""
    d = make_smollm2_dir(tmp_path / "j")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(QWEN25_TEMPLATE, encoding="utf-8")
    tok = ChatTokenizer.from_dir(d)
    assert tok.format.default_system == QWEN25_SYSTEM
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for msgs in CONVERSATIONS[:3]:
        assert tok.render(msgs, True) == hf_chat_ids(hf, msgs, True)


# --- assistant-only mask -----------------------------------------------------------------------------------------

def _runs(ids, mask):
    """Maximal runs of consecutive masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("name", list(MAKERS))
def test_mask_covers_exactly_assistant_content_and_end_of_turn(model_dirs, name):
    tok = ChatTokenizer.from_dir(model_dirs[name])
    eot = tok.format.end_of_turn
    msgs = [{"role": "system", "content": "Be honest."},
            {"role": "user", "content": "Tell me how to pick a lock."},
            {"role": "assistant", "content": "I can't help with breaking into property."},
            {"role": "user", "content": "héllo 你好 🙂"},
            {"role": "assistant", "content": "naïve café ✓ 🙂"}]
    ids, mask = tok.render_with_mask(msgs)
    assert ids == tok.render(msgs)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    runs = [tok.decode(r, skip_special_tokens=False) for r in _runs(ids, mask)]
    assert runs == [m["content"] + eot for m in msgs if m["role"] == "assistant"]
    # The unmasked tokens are exactly the rest of the text (headers, user/system turns, separators).
    rest = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    text = tok.render_prompt_text(msgs)
    for r in runs:
        text = text.replace(r, "", 1)
    assert rest == text


def test_mask_on_hand_built_chatml_conversation(model_dirs):
    tok = ChatTokenizer.from_dir(model_dirs["smollm2"])
    msgs = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "I am fine."}]
    ids, mask = tok.render_with_mask(msgs)
    im_start, im_end = tok.tokenizer.token_to_id("<|im_start|>"), tok.tokenizer.token_to_id("<|im_end|>")
    # The header "<|im_start|>assistant\n" is the prompt, not the target; so is the "\n" after <|im_end|>.
    header = tok.encode("<|im_start|>assistant\n")
    start = max(i for i in range(len(ids)) if ids[i] == im_start)
    assert ids[start:start + len(header)] == header and not any(mask[:start + len(header)])
    assert ids[-2] == im_end and mask[-2] == 1 and mask[-1] == 0 and tok.decode([ids[-1]]) == "\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "I am fine.<|im_end|>"
    # No assistant turn: nothing to learn.
    assert not any(tok.render_with_mask(msgs[:1])[1])


@pytest.mark.parametrize("name", list(MAKERS))
def test_mask_is_the_tokens_overlapping_assistant_text(model_dirs, name):
    """In general (also when BPE merges a header newline with a content that starts with newlines) a token is
    masked iff its characters overlap an assistant content + end-of-turn span, and together the masked tokens
    cover every such character."""
    tok = ChatTokenizer.from_dir(model_dirs[name])
    for msgs in CONVERSATIONS:
        text = tok.render_prompt_text(msgs)
        ids, mask = tok.render_with_mask(msgs)
        offsets = tok.tokenizer.encode(text, add_special_tokens=False).offsets
        assistant = [0] * len(text)  # 1 on characters the assistant wrote, found by searching the rendered text
        pos = 0
        for m in msgs:
            piece = tok.format.header(m["role"])
            pos = text.index(piece, pos) + len(piece)
            body = (m["content"].strip() if tok.format.trim_content else m["content"]) + tok.format.end_of_turn
            assert text.startswith(body, pos)
            if m["role"] == "assistant":
                assistant[pos:pos + len(body)] = [1] * len(body)
            pos += len(body)
        for (a, b), m in zip(offsets, mask):
            assert m == int(any(assistant[a:b])), (name, msgs, text[a:b])
        covered = [0] * len(text)
        for (a, b), m in zip(offsets, mask):
            if m:
                covered[a:b] = [1] * (b - a)
        assert all(c for c, x in zip(covered, assistant) if x)


# --- special ids ---------------------------------------------------------------------------------------------------

def test_special_ids(model_dirs):
    s = ChatTokenizer.from_dir(model_dirs["smollm2"])
    im_end = s.tokenizer.token_to_id("<|im_end|>")
    assert s.eos_id == im_end and s.pad_id == im_end and s.stop_ids == [im_end]
    assert s.vocab_size == s.tokenizer.get_vocab_size(with_added_tokens=True) > im_end

    q = ChatTokenizer.from_dir(model_dirs["qwen25"])
    im_end, eot = q.tokenizer.token_to_id("<|im_end|>"), q.tokenizer.token_to_id("<|endoftext|>")
    assert (q.eos_id, q.pad_id) == (im_end, eot)
    assert q.stop_ids == [im_end, eot]  # eos + the generation config's eos list, deduplicated

    ll = ChatTokenizer.from_dir(model_dirs["llama3"])
    eot = ll.tokenizer.token_to_id("<|eot_id|>")
    assert ll.eos_id == eot and ll.pad_id == eot  # no pad token: falls back to eos
    assert ll.stop_ids == [eot]
    assert ll.encode("Hello")[0] != ll.tokenizer.token_to_id("<|begin_of_text|>")


def test_pad_from_model_config_when_tokenizer_has_none(tmp_path):
    d = make_smollm2_dir(tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["pad_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"pad_token_id": 0, "eos_token_id": 2}))
    assert ChatTokenizer.from_dir(d).pad_id == 0


def test_encode_decode_roundtrip(model_dirs):
    tok = ChatTokenizer.from_dir(model_dirs["smollm2"])
    text = "héllo wörld ✓ 你好 🙂 <|im_end|> tail"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == text.replace("<|im_end|>", "")
    assert tok.tokenizer.token_to_id("<|im_end|>") in ids


# --- files and errors --------------------------------------------------------------------------------------------

def test_save_copies_tokenizer_files(model_dirs, tmp_path):
    tok = ChatTokenizer.from_dir(model_dirs["qwen25"])
    out = tmp_path / "saved"
    tok.save(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dirs["qwen25"] / name).read_bytes()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left behind
    again = ChatTokenizer.from_dir(out)
    msgs = CONVERSATIONS[2]
    assert again.render(msgs, True) == tok.render(msgs, True) and again.stop_ids == tok.stop_ids
    tok.save(model_dirs["qwen25"])  # saving onto its own directory is a no-op, not an error


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(MinicaiError) as e:
        ChatTokenizer.from_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "tokenizer.json") in str(e.value) and "Fix" in str(e.value)


@pytest.mark.parametrize("template", [
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",                       # Mistral
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}",                                                                                 # Qwen3-like
    "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: "
    "December 2023\\n' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}",         # Llama-3.1-like
])
def test_unknown_template_lists_supported_formats(tmp_path, template):
    d = make_smollm2_dir(tmp_path / "u", template)
    with pytest.raises(MinicaiError) as e:
        ChatTokenizer.from_dir(d)
    msg = str(e.value)
    assert all(name in msg for name in SUPPORTED_FORMATS) and "tokenizer_config.json" in msg


def test_missing_template_and_bad_messages(tmp_path, model_dirs):
    d = make_smollm2_dir(tmp_path / "n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MinicaiError, match="chat_template"):
        ChatTokenizer.from_dir(d)
    tok = ChatTokenizer.from_dir(model_dirs["smollm2"])
    with pytest.raises(MinicaiError, match="message 1"):
        tok.render([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}])
    with pytest.raises(MinicaiError):
        tok.render([])


# --- the real default model, when another step has already put it in the cache -------------------------------------

def _cached_model_dirs() -> list[Path]:
    root = Path(os.environ.get("MINICAI_CACHE") or Path.home() / ".cache" / "minicai")
    if not root.is_dir():
        return []
    return sorted({p.parent for p in root.glob("**/tokenizer.json")
                   if (p.parent / "tokenizer_config.json").is_file()})


def test_default_model_matches_transformers():
    dirs = _cached_model_dirs()
    if not dirs:
        pytest.skip("no converted model in $MINICAI_CACHE or ~/.cache/minicai (minicai.weights.default_model_dir() "
                    "creates it; this test does not download)")
    transformers = pytest.importorskip("transformers")
    for d in dirs:
        tok = ChatTokenizer.from_dir(d)
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        for msgs in CONVERSATIONS:
            for gen in (False, True):
                assert tok.render(msgs, gen) == hf_chat_ids(hf, msgs, gen), (d, msgs, gen)
        ids, mask = tok.render_with_mask(CONVERSATIONS[2])
        runs = [tok.decode(r, skip_special_tokens=False) for r in _runs(ids, mask)]
        assert runs == [m["content"] + tok.format.end_of_turn for m in CONVERSATIONS[2] if m["role"] == "assistant"]
