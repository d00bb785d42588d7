"""The SL-CAI critique -> revision loop (Bai et al., 2022, section 3.1), batched over prompts.

For each red-team prompt the helpful model first answers it as an ordinary chat. Then, for rounds r = 1..R, a
principle is drawn at random from the constitution; the model is shown the exchange, asked the principle's
critique request, writes a critique, is asked the paired revision request, and writes a revision. The revision
becomes the response for the next round. The (prompt, revision) pairs are the SL-CAI fine-tuning data.

Conversation layout (what the model sees; pinned by a golden test in tests/test_critique.py):

    initial answer:  [user: prompt] -> assistant: ...
    critique, round r:
        few-shot demonstrations, each as earlier turns of the same chat:
            <example conversation (user/assistant turns, ending in the harmful answer)>
            user: <example critique request>   assistant: <example critique>
            user: <example revision request>   assistant: <example revision>
        user: prompt   assistant: <current response>   user: <critique request r>  -> assistant: ...
    revision, round r: the critique conversation + [assistant: <critique r>, user: <revision request r>]
        -> assistant: ...

Round r + 1 starts afresh from the few-shot turns and [prompt, latest revision]: it does not see earlier
critiques. This follows the paper, which reuses the same pipeline on each revised prompt-response pair because
it is "formatted in the same manner as the original"; it also keeps the context short on a CPU. The chat
template adds the model's default system message in front (SmolLM2's), as for any other chat.

Texts are stripped of surrounding whitespace. An empty revision counts as a failure: the round is recorded with
`failed: true` and the previous response is kept.

Randomness: the principles of prompt i are drawn with random.Random(record_seed(seed, i)), so they depend only
on the seed and the prompt's index. Prompts are processed on a fixed grid of batches (batch k holds indices
k*B .. k*B+B-1) and every generate() call gets a seed derived from (seed, k, step). Records are appended to the
JSONL file as each batch finishes; a rerun skips the indices already written, so an interrupted run resumed
with the same --batch-size writes exactly the file an uninterrupted run writes.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from minicai import MinicaiError
from minicai.constitution import CritiqueExample, CritiquePrinciple, sample_principles
from minicai.data import Resumable
from minicai.sampling import generate, response_ids
from minicai.seeds import seed_from_labels


@dataclass
class CritiqueSettings:
    """Generation settings of the SL-CAI data stage; stored in every record so a resume can check them."""

    rounds: int = 2  # critique/revision rounds per prompt (the paper: 4)
    response_tokens: int = 48  # max new tokens of the initial answer (and of helpful answers)
    critique_tokens: int = 40
    revision_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    num_examples: int = 1  # few-shot demonstrations placed before each critique conversation
    batch_size: int = 8  # prompts per generate() call; part of the seed grid, so part of the settings
    seed: int = 0


ANSWER_KEYS = ("response_tokens", "temperature", "top_p", "top_k", "batch_size", "seed")


def answer_settings(settings: CritiqueSettings) -> dict:
    """The settings that shape a helpful answer (the critique settings do not, so changing them keeps helpful.jsonl)."""
    return {k: v for k, v in asdict(settings).items() if k in ANSWER_KEYS}


def record_seed(seed: int, index: int) -> int:
    """The seed of prompt number `index`: its principle draws depend on nothing else."""
    return seed_from_labels(seed, "record", index)


def draw_principles(principles: list[CritiquePrinciple], rounds: int, seed: int, index: int) -> list[CritiquePrinciple]:
    """The R principles of prompt `index`: independent draws with replacement (section 3.1), reproducible."""
    return sample_principles(principles, rounds, random.Random(record_seed(seed, index)))


# ----------------------------------------------------------------------------------------------------------------
# Conversations


def fewshot_messages(examples: list[CritiqueExample]) -> list[dict]:
    """The few-shot demonstrations as chat turns: conversation, critique request/critique, revision request/revision."""
    turns: list[dict] = []
    for ex in examples:
        turns += [dict(m) for m in ex.conversation]
        turns += [
            {"role": "user", "content": ex.critique_request},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": ex.revision_request},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


def answer_messages(prompt: str) -> list[dict]:
    """The plain chat in which the helpful model answers a prompt (initial response; helpful answers)."""
    return [{"role": "user", "content": prompt}]


def critique_messages(examples: list[CritiqueExample], prompt: str, response: str,
                      principle: CritiquePrinciple) -> list[dict]:
    """Few-shot turns + [user: prompt, assistant: response, user: critique request]; the model writes the critique."""
    return fewshot_messages(examples) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle.critique_request},
    ]


def revision_messages(examples: list[CritiqueExample], prompt: str, response: str,
                      principle: CritiquePrinciple, critique: str) -> list[dict]:
    """The critique conversation + [assistant: critique, user: revision request]; the model writes the revision."""
    return critique_messages(examples, prompt, response, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.revision_request},
    ]


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                   settings: CritiqueSettings, seed: int) -> list[tuple[str, bool]]:
    """One assistant reply per conversation, sampled in one batched generate() call.

    Returns (text stripped of surrounding whitespace, truncated) per conversation; truncated means the reply hit
    max_new_tokens before the end-of-turn token."""
    prompts = [tokenizer.render(c, add_generation_prompt=True) for c in conversations]
    gen = generate(model, prompts, max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                   top_p=settings.top_p, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id, seed=seed)
    out = []
    for i in range(len(prompts)):
        text = tokenizer.decode(response_ids(gen, i, tokenizer.stop_ids), skip_special_tokens=True)
        out.append((text.strip(), not bool(gen.finished[i])))
    return out


def critique_revise_batch(model, tokenizer, items: list[tuple[int, str]], principles: list[CritiquePrinciple],
                          examples: list[CritiqueExample], settings: CritiqueSettings, batch_seed: int) -> list[dict]:
    """Run the whole loop (initial answer, then R critique/revision rounds) for one batch of (index, prompt).

    Every step is one generate() call over the batch; call j gets seed seed_from_labels(batch_seed, j)."""
    s = settings
    shots = examples[: s.num_examples]
    replies = sample_replies(model, tokenizer, [answer_messages(p) for _, p in items], s.response_tokens, s,
                             seed_from_labels(batch_seed, "response"))
    records = []
    for (index, prompt), (response, truncated) in zip(items, replies):
        records.append({
            "index": index,
            "prompt": prompt,
            "initial_response": response,
            "initial_truncated": truncated,
            "rounds": [],
            "final_response": response,
            "seed": record_seed(s.seed, index),
            "settings": asdict(s),
        })
    drawn = [draw_principles(principles, s.rounds, s.seed, index) for index, _ in items]
    for r in range(s.rounds):
        ps = [d[r] for d in drawn]
        current = [rec["final_response"] for rec in records]
        crit = sample_replies(
            model, tokenizer,
            [critique_messages(shots, rec["prompt"], cur, p) for rec, cur, p in zip(records, current, ps)],
            s.critique_tokens, s, seed_from_labels(batch_seed, "critique", r + 1))
        rev = sample_replies(
            model, tokenizer,
            [revision_messages(shots, rec["prompt"], cur, p, c) for rec, cur, p, (c, _) in
             zip(records, current, ps, crit)],
            s.revision_tokens, s, seed_from_labels(batch_seed, "revision", r + 1))
        for rec, p, (c, c_trunc), (v, v_trunc) in zip(records, ps, crit, rev):
            failed = not v
            rec["rounds"].append({
                "round": r + 1,
                "principle": p.name,
                "critique_request": p.critique_request,
                "critique": c,
                "critique_truncated": c_trunc,
                "revision_request": p.revision_request,
                "revision": v,
                "revision_truncated": v_trunc,
                "failed": failed,  # empty revision: the previous response is kept
            })
            if not failed:
                rec["final_response"] = v
    for rec in records:
        rec["messages"] = [{"role": "user", "content": rec["prompt"]},
                           {"role": "assistant", "content": rec["final_response"]}]
    return records


def answer_batch(model, tokenizer, items: list[tuple[int, str]], settings: CritiqueSettings,
                 batch_seed: int) -> list[dict]:
    """The helpful model's own answers to helpfulness prompts (the SL-CAI mix that keeps it helpful, sec. 3.1)."""
    replies = sample_replies(model, tokenizer, [answer_messages(p) for _, p in items], settings.response_tokens,
                             settings, seed_from_labels(batch_seed, "response"))
    return [{
        "index": index,
        "prompt": prompt,
        "response": text,
        "truncated": truncated,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
        "seed": record_seed(settings.seed, index),
        "settings": answer_settings(settings),
    } for (index, prompt), (text, truncated) in zip(items, replies)]


# ----------------------------------------------------------------------------------------------------------------
# Resumable driver


def check_record(path: Path, prompts: list[str], want: dict) -> Callable[[int, dict], None]:
    """A Resumable check: record n of `path` must hold an index, the prompt file's prompt at that index and this
    run's settings, else resuming would mix two runs."""
    def check(n: int, rec: dict) -> None:
        i = rec.get("index")
        if not isinstance(i, int) or "prompt" not in rec:
            raise MinicaiError(f"{path}: record {n} has no 'index'/'prompt', so it was not written by this stage. "
                               f"Fix: pass another --out, or --force to start over.")
        if i < len(prompts) and rec["prompt"] != prompts[i]:
            raise MinicaiError(f"{path}: record {n} (index {i}) holds another prompt than the prompt file "
                               f"({rec['prompt'][:40]!r} vs {prompts[i][:40]!r}). Fix: use the same prompt file, "
                               f"another --out, or --force to start over.")
        if rec.get("settings") != want:
            diff = sorted(k for k in want if (rec.get("settings") or {}).get(k) != want[k])
            raise MinicaiError(f"{path}: record {n} was generated with other settings (differ: {', '.join(diff)}). "
                               f"Fix: rerun with the same flags, another --out, or --force to start over.")
    return check


def run_batches(path, prompts: list[str], want: dict,
                make_records: Callable[[list[tuple[int, str]], int], list[dict]], desc: str,
                on_batch: Callable[[dict], None] | None = None) -> list[dict]:
    """Process prompts batch by batch on the fixed index grid, appending each finished batch to `path`.

    make_records(items, batch_seed) turns one batch of (index, prompt) into records. Indices already in the file
    are skipped; `want` (with "batch_size" and "seed") must equal the "settings" of every record already there.
    Returns all records for these prompts, ordered by index."""
    path = Path(path)
    done = Resumable(path, key=lambda rec: rec["index"], check=check_record(path, prompts, want))
    B = want["batch_size"]
    if B < 1:
        raise MinicaiError(f"batch size must be >= 1, got {B}. Fix: pass --gen-batch-size 1 or more.")
    grid = [list(range(k, min(k + B, len(prompts)))) for k in range(0, len(prompts), B)]
    todo = [(k, [i for i in idx if i not in done]) for k, idx in enumerate(grid)]
    todo = [(k, idx) for k, idx in todo if idx]
    bar = tqdm(total=len(prompts), initial=len(prompts) - sum(len(i) for _, i in todo), desc=desc, unit="prompt",
               dynamic_ncols=True)
    for k, idx in todo:
        t0 = time.perf_counter()
        records = make_records([(i, prompts[i]) for i in idx], seed_from_labels(want["seed"], desc, k))
        for rec in records:
            done.add(rec)
        bar.update(len(idx))
        if on_batch is not None:
            on_batch({"phase": desc, "batch": k, "prompts": len(idx), "seconds": round(time.perf_counter() - t0, 3)})
    bar.close()
    return [done[i] for i in range(len(prompts))]


def run_critique_loop(model, tokenizer, prompts: list[str], principles: list[CritiquePrinciple],
                      examples: list[CritiqueExample], settings: CritiqueSettings, path,
                      on_batch: Callable[[dict], None] | None = None) -> list[dict]:
    """Critique and revise every red-team prompt; resumable (see the module docstring). -> records by index."""
    if settings.rounds < 0:
        raise MinicaiError(f"rounds must be >= 0, got {settings.rounds}. Fix: pass --rounds 1 or more.")
    if settings.num_examples > len(examples):
        raise MinicaiError(f"{settings.num_examples} few-shot examples asked for, the examples file has "
                           f"{len(examples)}. Fix: lower --num-examples or add examples.")
    if not principles:
        raise MinicaiError("the constitution has no critique principles. Fix: pass a --constitution with a "
                           "[critiques] section.")

    def make(items, batch_seed):
        return critique_revise_batch(model, tokenizer, items, principles, examples, settings, batch_seed)

    return run_batches(path, prompts, asdict(settings), make, "revisions", on_batch)


def run_answer_loop(model, tokenizer, prompts: list[str], settings: CritiqueSettings, path,
                    on_batch: Callable[[dict], None] | None = None) -> list[dict]:
    """The helpful model's answers to helpfulness prompts, resumable like run_critique_loop. -> records by index."""
    return run_batches(path, prompts, answer_settings(settings),
                       lambda items, batch_seed: answer_batch(model, tokenizer, items, settings, batch_seed),
                       "helpful", on_batch)


def format_record(rec: dict) -> str:
    """A readable transcript of one revisions.jsonl record (for logs and reports)."""
    lines = [f"[{rec['index']}] Prompt: {rec['prompt']}", f"Initial response: {rec['initial_response']}"]
    for r in rec["rounds"]:
        lines += [f"-- round {r['round']} ({r['principle']})", f"Critique request: {r['critique_request']}",
                  f"Critique: {r['critique']}", f"Revision request: {r['revision_request']}",
                  f"Revision: {r['revision']}" + ("   [failed: empty]" if r["failed"] else "")]
    lines.append(f"Final: {rec['final_response']}")
    return "\n".join(lines)
