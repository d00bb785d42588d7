"""Chat tokenizer: renders conversations in the model's own chat format and marks the assistant's tokens.

Constitutional AI (Bai et al., 2022) trains on dialogues: the SL stage (Sec. 3) fine-tunes on revised assistant
responses, and the RL stage (Sec. 4) samples assistant turns and scores them. Both need the exact prompt format the
instruct model was trained with, plus a 0/1 mask saying which tokens the assistant wrote (the SFT loss is taken on
those tokens only).

This module wraps a `tokenizers.Tokenizer` loaded from a Hugging Face model directory and renders the chat format
by hand instead of running the jinja `chat_template`. The format is *detected* from the template text:

- ``chatml``: ``<|im_start|>role\\n{content}<|im_end|>\\n`` (SmolLM2, Qwen2, Qwen2.5). When the conversation does not
  start with a system message the template injects a default one; its text is read out of the template itself.
- ``llama3``: ``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n{content}<|eot_id|>`` (Llama-3.0),
  content stripped of surrounding whitespace as the template's ``| trim`` does.

The rendered text is encoded as one string (as transformers' ``apply_chat_template`` does), so BPE merges across
turn boundaries are the same; the assistant mask comes from the character offsets of the encoding.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from minicai import MinicaiError
from minicai.data import atomic_write, read_json

# Files that make up a tokenizer in a Hugging Face model directory; `save` copies those that exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")

SUPPORTED_FORMATS = {
    "chatml": "<|im_start|>role\\n...<|im_end|>\\n (SmolLM2, Qwen2, Qwen2.5)",
    "llama3": "<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|> (Llama-3.0)",
}

ROLES = ("system", "user", "assistant")

# A jinja string literal, single- or double-quoted, with backslash escapes.
_JINJA_STRING = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""", re.DOTALL)
# `message['content'] | trim`, `message.content|trim`, ...: the template strips each message's content.
_TRIM_CONTENT = re.compile(r"""content['"]?\]?\s*\|\s*trim""")


@dataclass(frozen=True)
class ChatFormat:
    """How one message is laid out: header + content + end_of_turn + separator (see `render_prompt_text`)."""
    name: str                   # a key of SUPPORTED_FORMATS
    turn_start: str             # before the role name
    role_end: str               # after the role name, before the content
    end_of_turn: str            # closes a message; the assistant is trained to emit it (mask 1)
    separator: str              # after end_of_turn, outside the assistant span (mask 0)
    default_system: str | None  # injected when messages[0] is not a system message (None: nothing injected)
    trim_content: bool          # the template strips whitespace around each content
    bos: str                    # text put once before the first message ("" for none)

    def header(self, role: str) -> str:
        return self.turn_start + role + self.role_end


def _unescape_jinja(s: str) -> str:
    """Decode a jinja string literal body the way jinja's lexer does (Python-style backslash escapes)."""
    return s.encode("ascii", "backslashreplace").decode("unicode-escape")


def _string_literals(template: str) -> list[str]:
    """Every quoted string in the template, decoded; `{# comments #}` are dropped first (they may hold quotes)."""
    code = re.sub(r"\{#.*?#\}", "", template, flags=re.DOTALL)
    return [_unescape_jinja(m.group(1) if m.group(1) is not None else m.group(2))
            for m in _JINJA_STRING.finditer(code)]


def _default_system(template: str, header: str, end_of_turn: str) -> str | None:
    """The default system text hard-coded in the template, e.g. SmolLM2's
    ``'<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n'``; None if there is none.

    It is the one string literal that holds a whole system message (header, text, end-of-turn); the literal that
    only opens a system message around ``messages[0]['content']`` (Qwen2.5) does not hold the end-of-turn token."""
    for lit in _string_literals(template):
        if lit.startswith(header) and end_of_turn in lit:
            return lit[len(header):lit.index(end_of_turn)]
    return None


def detect_format(template: str, bos_token: str | None, where: str = "chat_template") -> ChatFormat:
    """Recognise the chat format from the jinja template text. Raises MinicaiError for anything else."""
    fmt = None
    if "<think>" in template:
        pass  # reasoning templates (Qwen3, SmolLM3) rewrite assistant turns; not rendered here
    elif "<|im_start|>" in template and "<|im_end|>" in template:
        fmt = ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n", None, False, "")
    elif ("<|start_header_id|>" in template and "<|eot_id|>" in template
          and "Cutting Knowledge Date" not in template):  # Llama-3.1+ adds a dated system preamble: not supported
        fmt = ChatFormat("llama3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "", None, False, "")
    if fmt is None:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_FORMATS.items())
        raise MinicaiError(f"{where}: unsupported chat template (starts {template[:80]!r}). minicai renders these "
                           f"formats only: {supported}. Fix: use a model whose tokenizer_config.json chat_template "
                           f"is one of them.")
    return replace(fmt, default_system=_default_system(template, fmt.header("system"), fmt.end_of_turn),
                   trim_content=bool(_TRIM_CONTENT.search(template)),
                   bos=(bos_token or "") if "bos_token" in template else "")


def _read_json(path: Path) -> dict:
    """One of the model directory's optional JSON object files ({} when it is absent)."""
    data = read_json(path, "repair or re-copy the file") if path.is_file() else {}
    if not isinstance(data, dict):
        raise MinicaiError(f"{path}: expected a JSON object, got {type(data).__name__}. Fix: re-copy the file.")
    return data


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise MinicaiError("empty conversation. Fix: pass at least one {'role': ..., 'content': ...} message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MinicaiError(f"message {i} is {m!r}. Fix: each message must be a dict with 'role' in {ROLES} "
                               f"and a string 'content'.")


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the model's chat format and special ids (eos, pad, stop ids)."""

    def __init__(self, tokenizer: Tokenizer, fmt: ChatFormat, eos_id: int, pad_id: int, stop_ids: list[int],
                 source_dir: Path | None = None):
        self.tokenizer = tokenizer
        self.format = fmt
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.source_dir = source_dir

    @classmethod
    def from_dir(cls, path) -> "ChatTokenizer":
        """Load tokenizer.json + tokenizer_config.json (and special_tokens_map.json, generation_config.json,
        config.json, chat_template.jinja when present) from a Hugging Face model directory."""
        d = Path(path)
        tok_path = d / "tokenizer.json"
        if not tok_path.is_file():
            raise MinicaiError(f"{tok_path}: not found. Fix: pass a Hugging Face model directory that holds "
                               f"tokenizer.json and tokenizer_config.json (e.g. --model default).")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust loader raises a plain Exception
            raise MinicaiError(f"{tok_path}: cannot be read by `tokenizers` ({e}). Fix: re-copy the file.") from e

        tcfg = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gcfg = _read_json(d / "generation_config.json")
        mcfg = _read_json(d / "config.json")

        template, where = _find_template(d, tcfg)
        bos_text = _token_text(tcfg.get("bos_token")) or _token_text(smap.get("bos_token"))
        fmt = detect_format(template, bos_text, where)

        def token_id(key: str) -> int | None:
            """Id of a special token named in tokenizer_config.json / special_tokens_map.json, else from the
            generation/model config ids."""
            for cfg, name in ((tcfg, "tokenizer_config.json"), (smap, "special_tokens_map.json")):
                text = _token_text(cfg.get(key))
                if text is not None:
                    tid = tokenizer.token_to_id(text)
                    if tid is None:
                        raise MinicaiError(f"{d / name}: {key} {text!r} is not in tokenizer.json's vocabulary. "
                                           f"Fix: set {key} to a token the tokenizer has.")
                    return tid
            for cfg in (gcfg, mcfg):
                ids = _id_list(cfg.get(key + "_id"))
                if ids:
                    return ids[0]
            return None

        eos_id = token_id("eos_token")
        if eos_id is None:
            raise MinicaiError(f"{d / 'tokenizer_config.json'}: no eos_token (nor eos_token_id in "
                               f"generation_config.json/config.json). Fix: add \"eos_token\": \"...\".")
        pad_id = token_id("pad_token")
        if pad_id is None:
            pad_id = eos_id
        eot_id = tokenizer.token_to_id(fmt.end_of_turn)
        if eot_id is None:
            raise MinicaiError(f"{tok_path}: the {fmt.name} end-of-turn token {fmt.end_of_turn!r} is not in the "
                               f"vocabulary. Fix: use the tokenizer that matches the chat template.")
        # Stop on eos, the end-of-turn token, and every eos the generation config lists (as HF generate does).
        stop_ids = []
        for i in [eos_id, eot_id] + _id_list(gcfg.get("eos_token_id")):
            if i not in stop_ids:
                stop_ids.append(i)
        return cls(tokenizer, fmt, eos_id, pad_id, stop_ids, source_dir=d)

    # -- plain text -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS or other special tokens are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------------------------

    def _render_spans(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character spans of each assistant turn's content + end-of-turn."""
        _check_messages(messages)
        f = self.format
        parts: list[str] = [f.bos]
        pos = len(f.bos)
        spans: list[tuple[int, int]] = []

        def add(text: str) -> None:
            nonlocal pos
            parts.append(text)
            pos += len(text)

        if f.default_system is not None and messages[0]["role"] != "system":
            add(f.header("system") + f.default_system + f.end_of_turn + f.separator)
        for m in messages:
            content = m["content"].strip() if f.trim_content else m["content"]
            add(f.header(m["role"]))
            start = pos
            add(content + f.end_of_turn)
            if m["role"] == "assistant":
                spans.append((start, pos))
            add(f.separator)
        if add_generation_prompt:
            add(f.header("assistant"))
        return "".join(parts), spans

    def render_prompt_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template would render it (a string; for logs and golden tests)."""
        return self._render_spans(messages, add_generation_prompt)[0]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation; equals transformers'
        `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.
        With `add_generation_prompt` the ids end with the assistant header, ready for sampling a reply."""
        return self.encode(self.render_prompt_text(messages, add_generation_prompt))

    def render_with_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids [T], mask [T]): mask is 1 on tokens the assistant wrote (each assistant content and its end-of-turn
        token) and 0 on everything else (system/user turns, role headers, the separator after end-of-turn).

        This is the target mask of the SL-CAI fine-tuning loss (Bai et al., 2022, Sec. 3): only the (revised)
        responses are learned. A token counts as the assistant's if its character span overlaps an assistant
        span; a BPE token merged across the header/content boundary (e.g. a content that starts with newlines)
        therefore gets mask 1."""
        text, spans = self._render_spans(messages, add_generation_prompt=False)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        s = 0
        for i, (a, b) in enumerate(enc.offsets):
            while s < len(spans) and a >= spans[s][1]:
                s += 1
            if s == len(spans):
                break
            if b > spans[s][0] and b > a:
                mask[i] = 1
        return list(enc.ids), mask

    # -- files --------------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Copy the tokenizer files this tokenizer was loaded from into model directory `path` (atomically each)."""
        if self.source_dir is None:
            raise MinicaiError("this ChatTokenizer was not loaded with from_dir, so there are no files to copy. "
                               "Fix: load it with ChatTokenizer.from_dir(model_dir).")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() == self.source_dir.resolve():
            return
        for name in TOKENIZER_FILES:
            src = self.source_dir / name
            if not src.is_file():
                continue
            atomic_write(out / name, lambda tmp: shutil.copyfile(src, tmp))


def _find_template(d: Path, tcfg: dict) -> tuple[str, str]:
    """The chat template text and the file it came from: chat_template.jinja wins over tokenizer_config.json (as in
    transformers); a list of named templates picks "default"."""
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    where = str(d / "tokenizer_config.json")
    t = tcfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not isinstance(t, str) or not t:
        raise MinicaiError(f"{where}: no chat_template (and no chat_template.jinja). Fix: use an instruct model's "
                           f"directory; minicai needs its chat format ({', '.join(SUPPORTED_FORMATS)}).")
    return t, where
