"""The SL-CAI critique -> revision loop (paper section 3.1): exact conversations, seeded principles, resumability."""

import json
from dataclasses import asdict

import pytest
import torch

import minicai.critique as critique
from minicai import MinicaiError
from minicai.constitution import CritiqueExample, CritiquePrinciple
from minicai.critique import CritiqueSettings, draw_principles, run_answer_loop, run_critique_loop
from minicai.model import Transformer
from minicai.tokenizer import ChatTokenizer

EXAMPLE = CritiqueExample(
    conversation=[{"role": "user", "content": "Ex Q"}, {"role": "assistant", "content": "Ex A"}],
    critique_request="Ex CR", critique="Ex C", revision_request="Ex RR", revision="Ex R",
)
PRINCIPLES = [CritiquePrinciple(f"p{i}", f"Critique request {i}", f"Revision request {i}") for i in range(8)]
PROMPTS = ["How do I pick a lock?", "Hi there", "Tell me a joke", "Insult me", "What is 2+2?"]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return Transformer.from_pretrained(tiny_model_dir), ChatTokenizer.from_dir(tiny_model_dir)


def small_settings(**kw) -> CritiqueSettings:
    base = dict(rounds=2, response_tokens=6, critique_tokens=5, revision_tokens=6, num_examples=1, batch_size=2,
                seed=0)
    base.update(kw)
    return CritiqueSettings(**base)


class FakeSampler:
    """Stands in for critique.sample_replies: records the rendered text the model would be given and replies with
    a label naming the call (answer / crit-r / rev-r), or "" for the calls listed in `empty`."""

    def __init__(self, empty=()):
        self.calls = []  # (rendered text of row 0, max_new_tokens, label)
        self.empty = set(empty)
        self.count = {"crit": 0, "rev": 0}

    def __call__(self, model, tokenizer, conversations, max_new_tokens, settings, seed):
        last = conversations[0][-1]["content"]
        if len(conversations[0]) == 1:
            label = "answer"
        else:
            kind = "crit" if last.startswith("Critique request") else "rev"
            self.count[kind] += 1
            label = f"{kind}-{self.count[kind]}"
        self.calls.append((tokenizer.render_prompt_text(conversations[0], add_generation_prompt=True),
                           max_new_tokens, label))
        text = "" if label in self.empty else label
        return [(text, False) for _ in conversations]


def turn(role, text):
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def test_conversation_layout_golden(tiny, monkeypatch, tmp_path):
    """The exact text the model is given at each step, for one prompt, one few-shot example, two rounds."""
    model, tok = tiny
    fake = FakeSampler()
    monkeypatch.setattr(critique, "sample_replies", fake)
    principle = [CritiquePrinciple("only", "Critique request X", "Revision request X")]
    recs = run_critique_loop(model, tok, ["Q?"], principle, [EXAMPLE], small_settings(), tmp_path / "r.jsonl")

    shots = (turn("user", "Ex Q") + turn("assistant", "Ex A") + turn("user", "Ex CR") + turn("assistant", "Ex C")
             + turn("user", "Ex RR") + turn("assistant", "Ex R"))
    gen = "<|im_start|>assistant\n"
    expected = [
        (SYSTEM + turn("user", "Q?") + gen, 6, "answer"),
        (SYSTEM + shots + turn("user", "Q?") + turn("assistant", "answer") + turn("user", "Critique request X")
         + gen, 5, "crit-1"),
        (SYSTEM + shots + turn("user", "Q?") + turn("assistant", "answer") + turn("user", "Critique request X")
         + turn("assistant", "crit-1") + turn("user", "Revision request X") + gen, 6, "rev-1"),
        # round 2 starts afresh from [prompt, latest revision]; round 1's critique is not shown
        (SYSTEM + shots + turn("user", "Q?") + turn("assistant", "rev-1") + turn("user", "Critique request X")
         + gen, 5, "crit-2"),
        (SYSTEM + shots + turn("user", "Q?") + turn("assistant", "rev-1") + turn("user", "Critique request X")
         + turn("assistant", "crit-2") + turn("user", "Revision request X") + gen, 6, "rev-2"),
    ]
    assert fake.calls == expected
    rec = recs[0]
    assert rec["initial_response"] == "answer" and rec["final_response"] == "rev-2"
    assert [r["critique"] for r in rec["rounds"]] == ["crit-1", "crit-2"]
    assert rec["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "rev-2"}]


def test_sampler_gets_the_rendered_chat(tiny, monkeypatch):
    """sample_replies feeds generate() exactly the chat template's tokens, ending with the assistant header."""
    model, tok = tiny
    seen = []
    real = critique.generate

    def spy(model, prompts, max_new_tokens, **kw):
        seen.append((prompts, kw))
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(critique, "generate", spy)
    convs = [critique.critique_messages([EXAMPLE], "Q?", "A.", PRINCIPLES[0]), critique.answer_messages("Hi")]
    out = critique.sample_replies(model, tok, convs, 4, small_settings(top_p=0.8, temperature=0.7), seed=5)
    prompts, kw = seen[0]
    assert [tok.decode(p, skip_special_tokens=False) for p in prompts] == [
        tok.render_prompt_text(c, add_generation_prompt=True) for c in convs]
    assert kw["temperature"] == 0.7 and kw["top_p"] == 0.8 and kw["seed"] == 5
    assert kw["stop_ids"] == tok.stop_ids and kw["pad_id"] == tok.pad_id
    assert len(out) == 2 and all(text == text.strip() for text, _ in out)


def test_replies_are_stripped_and_truncation_flagged(tiny, monkeypatch):
    """Surrounding whitespace goes; the stop token is not part of the text; no stop token = truncated."""
    from minicai.sampling import Generation

    model, tok = tiny
    eot = tok.stop_ids[-1]
    rows = [tok.encode("  hello there \n") + [eot], tok.encode("\n cut off")]
    width = max(map(len, rows))
    tokens = torch.full((2, width), tok.pad_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    fake = Generation(tokens, mask, torch.zeros(2, width), torch.tensor([True, False]))
    monkeypatch.setattr(critique, "generate", lambda *a, **k: fake)
    out = critique.sample_replies(model, tok, [critique.answer_messages("a"), critique.answer_messages("b")], 8,
                                  small_settings(), seed=0)
    assert out == [("hello there", False), ("cut off", True)]


def test_empty_revision_keeps_previous_response(tiny, monkeypatch, tmp_path):
    model, tok = tiny
    fake = FakeSampler(empty={"rev-1"})
    monkeypatch.setattr(critique, "sample_replies", fake)
    principle = [CritiquePrinciple("only", "Critique request X", "Revision request X")]
    rec = run_critique_loop(model, tok, ["Q?"], principle, [EXAMPLE], small_settings(), tmp_path / "r.jsonl")[0]
    assert [r["failed"] for r in rec["rounds"]] == [True, False]
    assert rec["rounds"][0]["revision"] == ""
    assert turn("assistant", "answer") + turn("user", "Critique request X") in fake.calls[3][0]  # round 2 sees it
    assert rec["final_response"] == "rev-2"


def test_records_have_every_field(tiny, tmp_path):
    model, tok = tiny
    s = small_settings(rounds=3)
    path = tmp_path / "revisions.jsonl"
    recs = run_critique_loop(model, tok, PROMPTS[:3], PRINCIPLES, [EXAMPLE], s, path)
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert on_disk == recs and [r["index"] for r in recs] == [0, 1, 2]
    by_name = {p.name: p for p in PRINCIPLES}
    assert len({rec["seed"] for rec in recs}) == 3  # each prompt its own seed
    for rec, prompt in zip(recs, PROMPTS):
        assert rec["prompt"] == prompt
        assert isinstance(rec["initial_response"], str) and isinstance(rec["initial_truncated"], bool)
        assert rec["settings"] == asdict(s)
        assert [r["round"] for r in rec["rounds"]] == [1, 2, 3]
        for r in rec["rounds"]:
            p = by_name[r["principle"]]
            assert (r["critique_request"], r["revision_request"]) == (p.critique_request, p.revision_request)
            assert all(r[key] == r[key].strip() for key in ("critique", "revision"))
        assert rec["messages"] == [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": rec["final_response"]}]


@pytest.mark.parametrize("empty,failed,final", [
    ((), [False, False, False], "rev-3"),
    (("rev-3",), [False, False, True], "rev-2"),
    (("rev-2", "rev-3"), [False, True, True], "rev-1"),
    (("rev-2",), [False, True, False], "rev-3"),
    (("rev-1", "rev-2", "rev-3"), [True, True, True], "answer"),
])
def test_final_response_is_the_last_non_empty_revision(tiny, monkeypatch, tmp_path, empty, failed, final):
    """Known replies (not the model's), so the expected record is written out rather than recomputed by the rule."""
    model, tok = tiny
    monkeypatch.setattr(critique, "sample_replies", FakeSampler(empty=empty))
    recs = run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(rounds=3, batch_size=2),
                             tmp_path / "r.jsonl")
    for rec in recs:
        assert rec["initial_response"] == "answer"
        assert [r["failed"] for r in rec["rounds"]] == failed
        assert [r["revision"] for r in rec["rounds"]] == ["" if f else f"rev-{k}" for k, f in enumerate(failed, 1)]
        assert rec["final_response"] == final
        assert rec["messages"][-1] == {"role": "assistant", "content": final}


def test_principles_are_drawn_from_the_seed(tiny, tmp_path):
    a = [[p.name for p in draw_principles(PRINCIPLES, 4, seed=1, index=i)] for i in range(12)]
    assert a == [[p.name for p in draw_principles(PRINCIPLES, 4, seed=1, index=i)] for i in range(12)]
    assert a != [[p.name for p in draw_principles(PRINCIPLES, 4, seed=2, index=i)] for i in range(12)]
    assert len({tuple(x) for x in a}) > 1  # prompts get different principles
    # the records use exactly these draws, whatever the batch size
    model, tok = tiny
    for bs in (1, 3):
        recs = run_critique_loop(model, tok, PROMPTS[:3], PRINCIPLES, [EXAMPLE],
                                 small_settings(rounds=4, seed=1, batch_size=bs), tmp_path / f"b{bs}.jsonl")
        assert [[r["principle"] for r in rec["rounds"]] for rec in recs] == a[:3]


def test_resume_after_interruption_gives_the_same_file(tiny, monkeypatch, tmp_path):
    model, tok = tiny
    s = small_settings()
    whole = tmp_path / "whole.jsonl"
    run_critique_loop(model, tok, PROMPTS, PRINCIPLES, [EXAMPLE], s, whole)

    part = tmp_path / "part.jsonl"
    real = critique.critique_revise_batch
    calls = []

    def crash_on_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(critique, "critique_revise_batch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_critique_loop(model, tok, PROMPTS, PRINCIPLES, [EXAMPLE], s, part)
    monkeypatch.setattr(critique, "critique_revise_batch", real)
    assert len(part.read_text().splitlines()) == 2  # the first batch was saved
    with open(part, "a") as f:
        f.write('{"index": 2, "prom')  # a crash in the middle of a write
    done = []
    monkeypatch.setattr(critique, "critique_revise_batch", lambda *a, **k: done.append(a[2]) or real(*a, **k))
    run_critique_loop(model, tok, PROMPTS, PRINCIPLES, [EXAMPLE], s, part)
    assert [i for items in done for i, _ in items] == [2, 3, 4]  # finished prompts were skipped
    assert part.read_bytes() == whole.read_bytes()
    done.clear()
    run_critique_loop(model, tok, PROMPTS, PRINCIPLES, [EXAMPLE], s, part)  # all done: nothing to generate
    assert done == [] and part.read_bytes() == whole.read_bytes()


def test_resume_refuses_other_settings_or_prompts(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "r.jsonl"
    run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(rounds=1), path)
    with pytest.raises(MinicaiError, match="rounds"):
        run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(rounds=2), path)
    with pytest.raises(MinicaiError, match="another prompt"):
        run_critique_loop(model, tok, ["other", "prompts"], PRINCIPLES, [EXAMPLE], small_settings(rounds=1), path)


def test_helpful_answers(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "helpful.jsonl"
    s = small_settings()
    recs = run_answer_loop(model, tok, PROMPTS[:3], s, path)
    assert [r["prompt"] for r in recs] == PROMPTS[:3]
    for r in recs:
        assert r["messages"] == [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["response"]}]
        assert r["settings"] == critique.answer_settings(s)
    # the critique settings do not shape a helpful answer, so changing them keeps the file usable
    again = run_answer_loop(model, tok, PROMPTS[:3], small_settings(rounds=4, critique_tokens=9), path)
    assert again == recs


def test_same_seed_same_text_different_seed_different(tiny, tmp_path):
    model, tok = tiny
    a = run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(seed=3), tmp_path / "a")
    b = run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(seed=3), tmp_path / "b")
    c = run_critique_loop(model, tok, PROMPTS[:2], PRINCIPLES, [EXAMPLE], small_settings(seed=4), tmp_path / "c")
    assert a == b
    assert [r["initial_response"] for r in a] != [r["initial_response"] for r in c]
