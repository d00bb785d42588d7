"""The constitution: principles and few-shot examples that steer Constitutional AI.

Bai et al. (2022) steer training with a short list of natural-language principles:
  * critique/revision pairs for the supervised stage (section 3.1): the model critiques its own
    response under a principle drawn at random, then revises the response;
  * multiple-choice comparison principles for AI feedback (section 4.1): the feedback model is asked
    which of two responses better follows a principle drawn at random.
Few-shot demonstrations of both tasks are put in front of the model's prompts.

This module reads them from the project's own plain-text constitution.txt (format documented in that
file's header) and JSONL example files, or from the paper's published JSON files, so the same code
runs with either. Draws are independent and with replacement, as in the paper.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from minicai import MinicaiError
from minicai.data import DATA_DIR, REPO_ROOT, iter_jsonl, parse_hh_transcript, read_json

DEFAULT_CONSTITUTION = REPO_ROOT / "constitution.txt"
DEFAULT_CRITIQUE_EXAMPLES = DATA_DIR / "critique_examples.jsonl"
DEFAULT_COMPARISON_EXAMPLES = DATA_DIR / "comparison_examples.jsonl"


@dataclass
class CritiquePrinciple:
    """One SL-CAI principle (section 3.1): a critique request and the paired revision request.

    Both are plain request text, without the "CritiqueRequest:" / "Critique:" framing labels."""

    name: str
    critique_request: str
    revision_request: str


@dataclass
class Constitution:
    """Critique/revision pairs for stage 1 and comparison principles for stage 2.

    comparisons holds the instruction text only (no leading newline, no trailing "Options:");
    the feedback prompt adds " Options:" and the (A)/(B) choices. A file may fill only one section."""

    critiques: list[CritiquePrinciple]
    comparisons: list[str]
    path: str


@dataclass
class CritiqueExample:
    """One few-shot critique/revision demonstration (paper section 3.1, Appendix E)."""

    conversation: list[dict]  # user/assistant turns ending with the assistant's (harmful) response
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass
class ComparisonExample:
    """One few-shot labelled comparison for the feedback model (paper section 4.1)."""

    conversation: list[dict]  # ends with the user's turn
    better: str
    worse: str


# ----------------------------------------------------------------------------------------------
# Constitution


def resolve_paper_name(path) -> Path:
    """A path as given, except that a bare file name of the paper's (e.g. "RLMadisonInstructions.json", see
    minicai.weights.PAPER_FILES) that is not a file here is read from ../shared, else downloaded once (pinned,
    sha256-checked) from the paper's GitHub repository into the cache."""
    from minicai.data import SHARED_DIR
    from minicai.weights import PAPER_FILES, paper_file

    path = Path(path)
    if path.exists() or str(path) not in PAPER_FILES:
        return path
    shared = SHARED_DIR / "data" / "cai-paper" / path.name
    return shared if shared.is_file() else paper_file(path.name)


def load_constitution(path=DEFAULT_CONSTITUTION, require: str | None = None) -> Constitution:
    """Read a constitution: the project's text format, or one of the paper's JSON files.

    CritiqueRevisionInstructions.json (a dict) fills `critiques`; RLMadisonInstructions.json
    (a list of strings) fills `comparisons`; the other section stays empty. Pass
    require="critiques" or "comparisons" to get a MinicaiError naming the file when that section
    is empty. Malformed input raises MinicaiError naming file:line and the fix.
    """
    path = resolve_paper_name(path)
    if not path.is_file():
        raise MinicaiError(f"{path}: constitution file not found (fix: check the path)")
    if path.suffix == ".json":
        constitution = _constitution_from_json(path, read_json(path, "repair the file"))
    else:
        constitution = _constitution_from_text(path, path.read_text(encoding="utf-8"))
    if require is not None:
        if require not in ("critiques", "comparisons"):
            raise ValueError(f"require must be 'critiques' or 'comparisons', got {require!r}")
        if not getattr(constitution, require):
            paper = "CritiqueRevisionInstructions.json" if require == "critiques" else "RLMadisonInstructions.json"
            raise MinicaiError(
                f"{path}: has no {require[:-1]} principles (fix: use a constitution.txt with a [{require}] "
                f"section, e.g. {DEFAULT_CONSTITUTION}, or the paper's {paper})"
            )
    return constitution


_SECTION = re.compile(r"^\[(.*)\]$")
_FIELD = re.compile(r"^(name|critique|revision):(.*)$")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_OPTIONS_TAIL = re.compile(r"\s*Options:\s*$")


def _constitution_from_text(path: Path, text: str) -> Constitution:
    """Parse the constitution.txt format (see the header of the project's constitution.txt)."""

    def fail(n: int, what: str, fix: str):
        raise MinicaiError(f"{path}:{n}: {what} (fix: {fix})")

    section: str | None = None
    seen_sections: set[str] = set()
    blocks: list[dict] = []  # critique blocks: {"line": n, "name": [n, text], "critique": ..., ...}
    comparisons: list[list] = []  # [line, text]
    target: list | None = None  # the [line, text] a continuation line extends

    def close_block():
        if blocks:
            b = blocks[-1]
            for key in ("critique", "revision"):
                if key not in b:
                    fail(b["line"], f"principle '{b['name'][1]}' has no '{key}:' line",
                         f"add a line '{key}: <request>' to this block")

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            target = None  # a blank line ends any continuation
            continue
        if stripped.startswith("#"):
            continue
        if line[0] in " \t":  # continuation of the field above
            if target is None:
                fail(n, "indented line with nothing to continue",
                     "remove the indentation, or put it right under the line it continues")
            target[1] = f"{target[1]} {stripped}"
            continue
        target = None
        m = _SECTION.match(stripped)
        if m:
            close_block()
            name = m.group(1).strip().lower()
            if name not in ("critiques", "comparisons"):
                fail(n, f"unknown section [{m.group(1)}]", "use [critiques] or [comparisons]")
            if name in seen_sections:
                fail(n, f"section [{name}] appears twice", "merge the two sections into one")
            seen_sections.add(name)
            section = name
            continue
        if section is None:
            fail(n, "text outside a section", "put it under a [critiques] or [comparisons] header, "
                 "or start the line with '#' to make it a comment")
        if section == "critiques":
            m = _FIELD.match(stripped)
            if not m:
                fail(n, f"expected 'name:', 'critique:' or 'revision:', got {stripped[:40]!r}",
                     "start the line with one of those keys, or indent it to continue the line above")
            key, value = m.group(1), m.group(2).strip()
            if key == "name":
                close_block()
                if not value:
                    fail(n, "empty name", "give the principle a short name, e.g. 'name: privacy'")
                if not _NAME.match(value):
                    fail(n, f"bad name {value!r}", "use only letters, digits, '-' and '_'")
                if any(b["name"][1] == value for b in blocks):
                    fail(n, f"duplicate name {value!r}", "give each principle its own name")
                blocks.append({"line": n, "name": [n, value]})
                target = blocks[-1]["name"]
                continue
            if not blocks:
                fail(n, f"'{key}:' line before any 'name:' line", "start each block with 'name: ...'")
            b = blocks[-1]
            if key in b:
                fail(n, f"second '{key}:' line in principle '{b['name'][1]}'",
                     "start a new block with 'name: ...' or remove the extra line")
            if key == "revision" and "critique" not in b:
                fail(n, f"'revision:' before 'critique:' in principle '{b['name'][1]}'",
                     "put the critique line first")
            b[key] = [n, value]
            target = b[key]
        else:  # comparisons
            if not (stripped == "-" or stripped.startswith("- ")):
                fail(n, f"expected a '- ' item, got {stripped[:40]!r}",
                     "start each comparison principle with '- ', or indent it to continue the item above")
            comparisons.append([n, stripped[1:].strip()])
            target = comparisons[-1]
    close_block()

    critiques = []
    for b in blocks:
        for key in ("critique", "revision"):
            if not b[key][1]:
                fail(b[key][0], f"empty '{key}:' text in principle '{b['name'][1]}'",
                     "write the request after the colon")
        critiques.append(CritiquePrinciple(b["name"][1], b["critique"][1], b["revision"][1]))
    principles = []
    for n, value in comparisons:
        value = _OPTIONS_TAIL.sub("", value).strip()
        if not value:
            fail(n, "empty comparison principle", "write the instruction after '- '")
        principles.append(value)
    if not critiques and not principles:
        raise MinicaiError(f"{path}: no principles found (fix: add a [critiques] or [comparisons] "
                           "section; see the header of constitution.txt for the format)")
    return Constitution(critiques=critiques, comparisons=principles, path=str(path))


def _read_json_file(path: Path):
    """A few-shot JSON file's content; a missing file or bad JSON is a MinicaiError naming it."""
    if not path.is_file():
        raise MinicaiError(f"{path}: file not found (fix: check the path)")
    return read_json(path, "repair the file")


def _unframe(text: str, label: str, tail: str) -> str:
    """Strip the paper's framing: "\\n\\n<label>: request\\n\\n<tail>:" -> "request"."""
    m = re.match(rf"\s*(?:{label}:)?(.*?)(?:\n\s*{tail}:)?\s*$", text, re.DOTALL)
    return m.group(1).strip()


def _constitution_from_json(path: Path, obj) -> Constitution:
    """The paper's CritiqueRevisionInstructions.json (dict) or RLMadisonInstructions.json (list), as read."""
    if isinstance(obj, dict):
        critiques = []
        for name, entry in obj.items():
            prompt = entry.get("prompt") if isinstance(entry, dict) else None
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else None  # the paper stores one critique per principle
            edit = entry.get("edit_request") if isinstance(entry, dict) else None
            if not isinstance(prompt, str) or not isinstance(edit, str):
                raise MinicaiError(
                    f"{path}: entry {name!r} needs 'prompt' and 'edit_request' strings "
                    "(fix: use the layout of the paper's CritiqueRevisionInstructions.json)"
                )
            critiques.append(CritiquePrinciple(
                name=str(name),
                critique_request=_unframe(prompt, "CritiqueRequest", "Critique"),
                revision_request=_unframe(edit, "RevisionRequest", "Revision"),
            ))
        if not critiques:
            raise MinicaiError(f"{path}: no principles found (fix: use a non-empty file)")
        return Constitution(critiques=critiques, comparisons=[], path=str(path))
    if isinstance(obj, list) and obj and all(isinstance(s, str) for s in obj):
        comparisons = [_OPTIONS_TAIL.sub("", s).strip() for s in obj]
        for i, s in enumerate(comparisons):
            if not s:
                raise MinicaiError(f"{path}: item {i} is empty (fix: remove it)")
        return Constitution(critiques=[], comparisons=comparisons, path=str(path))
    raise MinicaiError(
        f"{path}: expected a dict of critique principles or a non-empty list of comparison strings "
        "(fix: use constitution.txt, CritiqueRevisionInstructions.json or RLMadisonInstructions.json)"
    )


T = TypeVar("T")


def sample_principles(principles: Sequence[T], n: int, rng: random.Random) -> list[T]:
    """Draw n principles independently, with replacement (the paper draws one afresh each round).

    Seeded through `rng`, so the same seed gives the same draws."""
    if not principles:
        raise MinicaiError("no principles to draw from (fix: load a constitution with this section)")
    return [rng.choice(principles) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Few-shot examples


def _check_conversation(conv, where: str, last_role: str) -> list[dict]:
    ok = (
        isinstance(conv, list) and conv
        and all(isinstance(m, dict) and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str) for m in conv)
    )
    if not ok:
        raise MinicaiError(f"{where}: 'conversation' must be a non-empty list of "
                           "{\"role\": \"user\"|\"assistant\", \"content\": \"...\"} (fix: repair it)")
    if conv[-1]["role"] != last_role:
        raise MinicaiError(f"{where}: the conversation must end with a {last_role} turn "
                           f"(fix: end it with the {last_role}'s message)")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def _require_strings(record: dict, keys: Sequence[str], where: str) -> None:
    for key in keys:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise MinicaiError(f"{where}: missing or empty '{key}' (fix: add \"{key}\": \"...\")")


_CRITIQUE_FEWSHOT = re.compile(
    r"^(?P<conv>.*?)\n\nCritiqueRequest:(?P<creq>.*?)\n\nCritique:(?P<crit>.*?)"
    r"\n\nRevisionRequest:(?P<rreq>.*?)\n\nRevision:(?P<rev>.*?)(?:\n\nHuman:\s*)?$",
    re.DOTALL,
)


def load_critique_examples(path=DEFAULT_CRITIQUE_EXAMPLES) -> list[CritiqueExample]:
    """Few-shot critique/revision demonstrations.

    Project JSONL: one {"conversation", "critique_request", "critique", "revision_request",
    "revision"} per line. Paper JSON (CritiqueRevisionFewShotPrompts.json): a list of transcripts
    "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ...\\n\\nCritique: ...
    \\n\\nRevisionRequest: ...\\n\\nRevision: ...", possibly with several turns and a trailing
    "\\n\\nHuman:".
    """
    path = resolve_paper_name(path)
    examples = []
    if path.suffix == ".json":
        obj = _read_json_file(path)
        if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
            raise MinicaiError(f"{path}: expected a list of transcript strings "
                               "(fix: use the layout of CritiqueRevisionFewShotPrompts.json)")
        for i, s in enumerate(obj):
            where = f"{path}: item {i}"
            m = _CRITIQUE_FEWSHOT.match(s)
            if not m:
                raise MinicaiError(f"{where}: expected Human/Assistant turns, then CritiqueRequest:, "
                                   "Critique:, RevisionRequest:, Revision: (fix: repair the transcript)")
            try:
                conv = parse_hh_transcript(m.group("conv"))
            except MinicaiError as e:
                raise MinicaiError(f"{where}: {e}") from None
            examples.append(CritiqueExample(
                conversation=_check_conversation(conv, where, "assistant"),
                **{k: m.group(g).strip() for k, g in (("critique_request", "creq"), ("critique", "crit"),
                                                      ("revision_request", "rreq"), ("revision", "rev"))},
            ))
    else:
        keys = ("critique_request", "critique", "revision_request", "revision")
        for n, rec in iter_jsonl(path):
            where = f"{path}:{n}"
            _require_strings(rec, keys, where)
            examples.append(CritiqueExample(
                conversation=_check_conversation(rec.get("conversation"), where, "assistant"),
                **{k: rec[k].strip() for k in keys},
            ))
    if not examples:
        raise MinicaiError(f"{path}: no examples (fix: add at least one)")
    return examples


def load_comparison_examples(path=DEFAULT_COMPARISON_EXAMPLES) -> list[ComparisonExample]:
    """Few-shot labelled comparisons for the feedback model.

    Project JSONL: one {"conversation" (ending with a user turn), "better", "worse"} per line.
    Paper JSON (RLMadisonFewShotPrompts.json): a list of {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:",
    "corrects": [...], "incorrects": [...]}; the first correct and first incorrect are used.
    """
    path = resolve_paper_name(path)
    examples = []
    if path.suffix == ".json":
        obj = _read_json_file(path)
        if not isinstance(obj, list):
            raise MinicaiError(f"{path}: expected a list of {{prompt, corrects, incorrects}} "
                               "(fix: use the layout of RLMadisonFewShotPrompts.json)")
        for i, rec in enumerate(obj):
            where = f"{path}: item {i}"
            good = rec.get("corrects") if isinstance(rec, dict) else None
            bad = rec.get("incorrects") if isinstance(rec, dict) else None
            if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and good and bad
                    and isinstance(good[0], str) and isinstance(bad[0], str)):
                raise MinicaiError(f"{where}: needs 'prompt', non-empty 'corrects' and 'incorrects' "
                                   "(fix: use the layout of RLMadisonFewShotPrompts.json)")
            try:
                conv = parse_hh_transcript(rec["prompt"])
            except MinicaiError as e:
                raise MinicaiError(f"{where}: {e}") from None
            examples.append(ComparisonExample(
                conversation=_check_conversation(conv, where, "user"),
                better=good[0].strip(), worse=bad[0].strip(),
            ))
    else:
        for n, rec in iter_jsonl(path):
            where = f"{path}:{n}"
            _require_strings(rec, ("better", "worse"), where)
            examples.append(ComparisonExample(
                conversation=_check_conversation(rec.get("conversation"), where, "user"),
                better=rec["better"].strip(), worse=rec["worse"].strip(),
            ))
    if not examples:
        raise MinicaiError(f"{path}: no examples (fix: add at least one)")
    return examples
