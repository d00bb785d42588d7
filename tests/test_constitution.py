"""Specification of minicai/constitution.py: the constitution file format, the paper's JSON files,
few-shot example loaders, and seeded principle draws."""

import json
import random
from pathlib import Path

import pytest

from minicai import MinicaiError
from minicai.constitution import (
    DEFAULT_COMPARISON_EXAMPLES,
    DEFAULT_CONSTITUTION,
    DEFAULT_CRITIQUE_EXAMPLES,
    CritiquePrinciple,
    load_comparison_examples,
    load_constitution,
    load_critique_examples,
    sample_principles,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO.parent / "shared" / "data" / "cai-paper"


def paper_file(name: str) -> Path:
    path = PAPER / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the read-only ../shared folder is absent on this machine)")
    return path


# ---------------------------------------------------------------------------------------------
# The project's constitution.txt


def test_project_constitution_has_enough_principles():
    c = load_constitution(DEFAULT_CONSTITUTION)
    assert DEFAULT_CONSTITUTION == REPO / "constitution.txt"
    assert len(c.critiques) >= 16 and len(c.comparisons) >= 16
    assert len({p.name for p in c.critiques}) == len(c.critiques)
    for p in c.critiques:
        assert p.critique_request and p.revision_request
        assert "response" in p.critique_request and "response" in p.revision_request
    for s in c.comparisons:
        assert not s.startswith("\n") and not s.rstrip().endswith("Options:")
        assert len(s.split()) >= 5
    assert len(set(c.comparisons)) == len(c.comparisons)


def test_project_constitution_is_not_the_papers_text():
    """The project writes its principles in its own words: no principle equals one of the paper's."""
    ours = load_constitution(DEFAULT_CONSTITUTION)
    crit = load_constitution(paper_file("CritiqueRevisionInstructions.json"))
    comp = load_constitution(paper_file("RLMadisonInstructions.json"))
    paper_texts = {p.critique_request for p in crit.critiques} | {p.revision_request for p in crit.critiques}
    assert not paper_texts & ({p.critique_request for p in ours.critiques} | {p.revision_request for p in ours.critiques})
    assert not set(comp.comparisons) & set(ours.comparisons)


def write(tmp_path: Path, text: str, name: str = "constitution.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
# a comment
[critiques]

name: alpha
critique: Find the harm in the
  assistant's last response.
revision: Rewrite it.

# another comment
name: beta
critique: Second critique.
revision: Second revision.

[comparisons]
- Which response is less harmful?
- Choose the kinder response,
  please. Options:
"""


def test_format_parses_blocks_continuations_and_comments(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    assert c.critiques == [
        CritiquePrinciple("alpha", "Find the harm in the assistant's last response.", "Rewrite it."),
        CritiquePrinciple("beta", "Second critique.", "Second revision."),
    ]
    # A trailing "Options:" is removed: the feedback prompt adds it itself.
    assert c.comparisons == ["Which response is less harmful?", "Choose the kinder response, please."]
    assert c.path.endswith("constitution.txt")


def test_a_file_may_have_only_one_section(tmp_path):
    c = load_constitution(write(tmp_path, "[comparisons]\n- Pick the better one.\n"))
    assert c.critiques == [] and c.comparisons == ["Pick the better one."]
    with pytest.raises(MinicaiError, match=r"constitution\.txt: has no critique principles"):
        load_constitution(tmp_path / "constitution.txt", require="critiques")
    assert load_constitution(tmp_path / "constitution.txt", require="comparisons").comparisons


def line_of(text: str, fragment: str) -> int:
    """1-based number of the first line containing fragment (so tests do not hard-code numbers)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


@pytest.mark.parametrize(
    "broken, marker, words",
    [
        # missing revision line: reported at the block's name line
        (GOOD.replace("revision: Second revision.\n", ""), "name: beta", "no 'revision:'"),
        (GOOD.replace("[comparisons]", "[comparison]"), "[comparison]", "unknown section"),
        ("stray text\n" + GOOD, "stray text", "outside a section"),
        (GOOD.replace("name: beta", "name:"), "name:\n", "empty name"),
        # (trailing space: the marker then matches only the second, duplicated line)
        (GOOD.replace("name: beta", "name: alpha "), "name: alpha ", "duplicate name"),
        (GOOD.replace("- Which response", "Which response"), "Which response", "expected a '- ' item"),
        (GOOD.replace("critique: Second critique.", "critque: Second critique."), "critque", "expected 'name:'"),
        ("[critiques]\n   floating text\n", "floating text", "nothing to continue"),
        (GOOD.replace("critique: Second critique.", "critique:"), "critique:\n", "empty 'critique:'"),
    ],
    ids=["missing-revision", "unknown-section", "outside-section", "empty-name", "duplicate-name",
         "not-an-item", "unknown-key", "stray-indent", "empty-critique"],
)
def test_malformed_entries_name_file_and_line(tmp_path, broken, marker, words):
    path = write(tmp_path, broken)
    if marker.endswith("\n"):  # a bare key: find the line that is exactly it
        expected = next(i for i, l in enumerate(broken.splitlines(), 1) if l == marker.strip())
    else:
        expected = line_of(broken, marker)
    with pytest.raises(MinicaiError) as err:
        load_constitution(path)
    message = str(err.value)
    assert f"constitution.txt:{expected}:" in message, message
    assert words in message and "fix:" in message


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(MinicaiError, match="no principles"):
        load_constitution(write(tmp_path, "# only comments\n\n"))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(MinicaiError, match="not found"):
        load_constitution(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------
# The paper's JSON files


def test_paper_critique_instructions_load_without_framing():
    path = paper_file("CritiqueRevisionInstructions.json")
    raw = json.loads(path.read_text())
    c = load_constitution(path, require="critiques")
    assert len(c.critiques) == len(raw) == 16 and c.comparisons == []
    first = c.critiques[0]
    assert first.name == next(iter(raw))
    # The labels and the trailing "Critique:" / "Revision:" cue are stripped; the request text stays.
    assert raw[first.name]["prompt"][0].strip().startswith("CritiqueRequest: " + first.critique_request[:20])
    for p in c.critiques:
        for text in (p.critique_request, p.revision_request):
            assert text == text.strip() and text
            assert "Request:" not in text and not text.endswith(("Critique:", "Revision:"))


def test_paper_comparison_instructions_load_without_options_tail():
    path = paper_file("RLMadisonInstructions.json")
    raw = json.loads(path.read_text())
    c = load_constitution(path)
    assert len(c.comparisons) == len(raw) == 16 and c.critiques == []
    for ours, theirs in zip(c.comparisons, raw):
        assert theirs.strip() == ours + " Options:"
    with pytest.raises(MinicaiError, match="has no critique principles"):
        load_constitution(path, require="critiques")


def test_bad_json_names_the_line(tmp_path):
    path = write(tmp_path, '[\n"one",\n"two"\n"three"]\n', name="principles.json")
    with pytest.raises(MinicaiError, match=r"principles\.json:4:"):
        load_constitution(path)
    path = write(tmp_path, '{"a": {"prompt": ["x"]}}', name="principles.json")
    with pytest.raises(MinicaiError, match="edit_request"):
        load_constitution(path)


# ---------------------------------------------------------------------------------------------
# Few-shot examples


def test_project_critique_examples():
    examples = load_critique_examples(DEFAULT_CRITIQUE_EXAMPLES)
    assert 3 <= len(examples) <= 4
    for ex in examples:
        assert ex.conversation[0]["role"] == "user" and ex.conversation[-1]["role"] == "assistant"
        assert all(m["content"] for m in ex.conversation)
        assert ex.critique_request and ex.critique and ex.revision_request and ex.revision
        # short enough for a small model's context (a rough words-based bound on ~250 tokens)
        text = " ".join([m["content"] for m in ex.conversation] + [ex.critique_request, ex.critique,
                                                                   ex.revision_request, ex.revision])
        assert len(text.split()) < 190
    assert any(len(ex.conversation) > 2 for ex in examples)  # at least one multi-turn demonstration


def test_project_comparison_examples():
    examples = load_comparison_examples(DEFAULT_COMPARISON_EXAMPLES)
    assert 3 <= len(examples) <= 4
    for ex in examples:
        assert ex.conversation[-1]["role"] == "user"
        assert ex.better and ex.worse and ex.better != ex.worse


def paper_examples(name: str, load) -> list[tuple]:
    """(example, the paper's record it came from) for every demonstration in the paper's file `name`, read with
    `load`: one example per record, none lost or merged."""
    path = paper_file(name)
    raw = json.loads(path.read_text())
    examples = load(path)
    assert len(examples) == len(raw)
    return list(zip(examples, raw))


def test_paper_critique_fewshot_prompts():
    pairs = paper_examples("CritiqueRevisionFewShotPrompts.json", load_critique_examples)
    for ex, text in pairs:
        roles = [m["role"] for m in ex.conversation]
        assert roles[-1] == "assistant" and roles[0] == "user"
        assert roles.count("user") == text.count("\n\nHuman:") - text.rstrip().endswith("Human:")
        assert "\n\nRevision: " + ex.revision in text
        assert not ex.revision.endswith("Human:")
        assert text.count("\n\nCritique: " + ex.critique) == 1
    first, text = pairs[0]
    # The first demonstration has two exchanges: check its opening turn by hand.
    assert first.conversation[0]["content"] == text.split("\n\nHuman: ")[1].split("\n\nAssistant:")[0]
    assert len(first.conversation) == 4


def test_paper_comparison_fewshot_prompts():
    for ex, rec in paper_examples("RLMadisonFewShotPrompts.json", load_comparison_examples):
        assert ex.conversation[-1]["role"] == "user"
        assert rec["prompt"].startswith("\n\nHuman: " + ex.conversation[0]["content"])
        assert ex.better == rec["corrects"][0].strip() and ex.worse == rec["incorrects"][0].strip()


def test_bad_example_record_names_file_and_line(tmp_path):
    good = json.dumps({"conversation": [{"role": "user", "content": "hi"}], "better": "a", "worse": "b"})
    ends_wrong = json.dumps({"conversation": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "x"}], "better": "a", "worse": "b"})
    path = tmp_path / "cmp.jsonl"
    path.write_text(f"{good}\n\n{ends_wrong}\n")
    with pytest.raises(MinicaiError, match=r"cmp\.jsonl:3: .*end with a user turn"):
        load_comparison_examples(path)
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ok = {"conversation": conv, "critique_request": "c", "critique": "k", "revision_request": "r", "revision": "v"}
    path = tmp_path / "crit.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "critique": ""}) + "\n")
    with pytest.raises(MinicaiError, match=r"crit\.jsonl:2: missing or empty 'critique'"):
        load_critique_examples(path)


# ---------------------------------------------------------------------------------------------
# Seeded draws


def test_sample_principles_is_reproducible_and_draws_with_replacement():
    principles = load_constitution(DEFAULT_CONSTITUTION).critiques
    a = sample_principles(principles, 200, random.Random(7))
    b = sample_principles(principles, 200, random.Random(7))
    c = sample_principles(principles, 200, random.Random(8))
    assert a == b and a != c
    assert len(a) == 200 and all(p in principles for p in a)
    # With replacement: 200 draws from ~18 principles repeat, and most principles get drawn.
    assert len({p.name for p in a}) < len(a)
    assert len({p.name for p in a}) >= len(principles) - 2
    assert sample_principles(principles, 0, random.Random(0)) == []
    with pytest.raises(MinicaiError):
        sample_principles([], 1, random.Random(0))


def test_a_bare_paper_file_name_is_read_from_shared_or_downloaded(tmp_path, monkeypatch):
    """`--constitution RLMadisonInstructions.json` works on any machine: ../shared's copy, else the paper's
    repository (pinned, sha256-checked) through minicai.weights.paper_file."""
    from minicai import weights
    from minicai.constitution import load_comparison_examples, load_constitution, resolve_paper_name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("minicai.data.SHARED_DIR", tmp_path / "no-shared")
    fetched = []

    def fake_paper_file(name):
        fetched.append(name)
        target = tmp_path / name
        shot = {"prompt": "\n\nHuman: hi\n\nAssistant:", "corrects": [" Hello!"], "incorrects": [" Go away."]}
        target.write_text(json.dumps(["Which response is less harmful?"] if "Instructions" in name else [shot]))
        return target

    monkeypatch.setattr(weights, "paper_file", fake_paper_file)
    assert load_constitution("RLMadisonInstructions.json").comparisons[0].startswith("Which response")
    assert load_comparison_examples("RLMadisonFewShotPrompts.json")[0].better == "Hello!"
    assert fetched == ["RLMadisonInstructions.json", "RLMadisonFewShotPrompts.json"]
    assert resolve_paper_name("other.json") == Path("other.json")  # not a paper file name: as given
