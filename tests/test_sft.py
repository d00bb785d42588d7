"""SL-CAI fine-tuning (paper section 3.1): assistant-only targets, batching, schedule, training, the CLI stage."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minicai import MinicaiError
from minicai.losses import sft_loss
from minicai.model import Transformer, random_model
from minicai.run import remove_outputs, save_model
from minicai.sft import (Example, SFTConfig, build_examples, collate, encode_example, evaluate_loss, helpful_pairs,
                         lr_at, revision_pairs, split_heldout, train_sft)
from minicai.tokenizer import ChatTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return ChatTokenizer.from_dir(tiny_model_dir)


def chat(*turns):
    return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


def test_assistant_only_mask_on_a_hand_built_conversation(tok):
    e = encode_example(tok, chat("hi", "Hello there", "more", "ok"), max_len=10_000)
    ids, mask = e.ids, e.mask
    assert len(ids) == len(mask)
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == "Hello there<|im_end|>ok<|im_end|>"
    ignored = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert "hi" in ignored and "more" in ignored and "Hello" not in ignored


def test_truncation_keeps_the_prompt_and_cuts_the_response_end(tok):
    msgs = chat("a question", "a long answer that goes on and on and on")
    full = encode_example(tok, msgs, 10_000)
    prompt_len = full.mask.index(1)
    cut = encode_example(tok, msgs, prompt_len + 3)
    assert cut.ids == full.ids[: prompt_len + 3] and cut.mask == full.mask[: prompt_len + 3]
    assert sum(cut.mask) == 3
    assert encode_example(tok, msgs, prompt_len) is None  # nothing left to learn
    item = {"source": "revision", "messages": msgs, "truncated": False}
    kept, dropped = build_examples(tok, [item, {**item, "source": "helpful"}], prompt_len)
    assert kept == [] and dropped == 2


def test_a_cut_off_reply_is_learned_without_its_end_of_turn(tok):
    """A reply that hit the token limit must not teach the model to stop mid-sentence."""
    msgs = chat("a question", "an answer that was cut")
    whole, cut = build_examples(tok, [{"source": "revision", "messages": msgs, "truncated": t}
                                      for t in (False, True)], 10_000)[0]

    def learned(e):
        return tok.decode([i for i, m in zip(e.ids, e.mask) if m], skip_special_tokens=False)

    assert learned(whole) == "an answer that was cut<|im_end|>"
    assert learned(cut) == "an answer that was cut"
    assert cut.ids == whole.ids[: len(cut.ids)]


def test_collate_right_pads():
    a, b = Example([5, 6, 7], [0, 1, 1], "x"), Example([8, 9], [0, 1], "x")
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_revision_pairs_all_rounds_or_final():
    rec = {"prompt": "P", "rounds": [{"revision": "r1", "failed": False, "revision_truncated": True},
                                     {"revision": "r2", "failed": False, "revision_truncated": False},
                                     {"revision": "", "failed": True, "revision_truncated": False}]}
    never = {"prompt": "Q", "rounds": [{"revision": "", "failed": True}]}
    item = lambda p, a, t, src="revision": {"source": src, "truncated": t, "messages": chat(p, a)}  # noqa: E731
    assert revision_pairs([rec, never], "all") == [item("P", "r1", True), item("P", "r2", False)]
    assert revision_pairs([rec, never], "final") == [item("P", "r2", False)]
    helpful = [{"prompt": "H", "response": "ans", "truncated": False}, {"prompt": "E", "response": "  "}]
    assert helpful_pairs(helpful) == [item("H", "ans", False, "helpful")]
    with pytest.raises(MinicaiError):
        revision_pairs([rec], "best")


def test_lr_schedule():
    peak, total, warm = 1.0, 11, 2
    lrs = [lr_at(s, total, peak, warm, "cosine", 0.1) for s in range(total)]
    assert lrs[:2] == [0.5, 1.0]  # linear warmup reaches the peak
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:]))  # decays monotonically
    mid = lr_at(2 + 4, total, peak, warm, "cosine", 0.1)  # halfway through the decay: cos(pi/2) = 0
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(6, total, peak, warm, "linear", 0.0) == pytest.approx(0.5)
    assert lr_at(9, total, peak, warm, "constant") == 1.0


def test_heldout_split_is_seeded_and_disjoint():
    items = list(range(20))
    tr, ho = split_heldout(items, 0.2, seed=3)
    assert (tr, ho) == split_heldout(items, 0.2, seed=3)
    assert len(ho) == 4 and sorted(tr + ho) == items
    assert ho != split_heldout(items, 0.2, seed=4)[1]
    assert len(split_heldout(items[:3], 0.1, 0)[1]) == 1  # at least one held-out example


def examples_for(tok, n=4):
    items = [{"source": "revision", "messages": chat(f"question {i}", f"I can't help with that {i}.")}
             for i in range(n)]
    return build_examples(tok, items, 512)[0]


def test_loss_falls_when_overfitting(tiny_model_dir, tok):
    torch.manual_seed(0)
    model = Transformer.from_pretrained(tiny_model_dir)
    data = examples_for(tok)
    logged = []
    cfg = SFTConfig(steps=25, lr=1e-2, warmup=2, batch_size=4, seed=0)
    before = evaluate_loss(model, data, tok.pad_id)
    summary = train_sft(model, data, data[:1], cfg, tok.pad_id, log=logged.append, progress=False)
    after = evaluate_loss(model, data, tok.pad_id)
    assert after < 0.5 * before
    steps = [r for r in logged if r["phase"] == "sft"]
    assert [r["step"] for r in steps] == list(range(1, 26))
    for r in steps:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [r for r in logged if r["phase"] == "sft_eval"]
    assert evals[0]["step"] == 0 and len(evals) == 1 + 25  # before training, then after each 1-step epoch
    assert summary["steps"] == 25 and len(summary["heldout_losses"]) == len(evals)


def test_gradient_accumulation_equals_one_big_batch(tok):
    """Token-weighted accumulation: 2 micro-batches of 2 give the same update as one batch of 4 (float64)."""
    from minicai.model import tiny_config

    cfg_model = tiny_config(vocab_size=tok.vocab_size)
    data = examples_for(tok)
    data[1] = Example(data[1].ids + data[1].ids[-3:], data[1].mask + [1, 1, 1], "x")  # unequal token counts
    params = []
    for bs, acc in ((4, 1), (2, 2)):
        model = random_model(cfg_model, seed=1, dtype=torch.float64)
        train_sft(model, data, [], SFTConfig(steps=1, lr=1e-3, warmup=0, schedule="constant", clip=0, batch_size=bs,
                                             grad_accum=acc, seed=0), tok.pad_id, progress=False)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-12, rtol=0)
    fresh = torch.cat([p.flatten() for p in random_model(cfg_model, seed=1, dtype=torch.float64).parameters()])
    assert not torch.allclose(params[0], fresh)


def test_saved_checkpoint_reloads_to_identical_logits(tiny_model_dir, tok, tmp_path):
    model = Transformer.from_pretrained(tiny_model_dir)
    data = examples_for(tok)
    train_sft(model, data, [], SFTConfig(steps=2, lr=1e-2, batch_size=2), tok.pad_id, progress=False)
    save_model(model, tok, tmp_path / "m")
    again = Transformer.from_pretrained(tmp_path / "m")
    batch = collate(data, tok.pad_id)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"])
        b = again(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)
    assert not torch.equal(a, Transformer.from_pretrained(tiny_model_dir)(batch["input_ids"], batch["attention_mask"]))
    assert ChatTokenizer.from_dir(tmp_path / "m").render(chat("x")) == tok.render(chat("x"))


def test_evaluate_loss_matches_sft_loss(tiny_model_dir, tok):
    model = Transformer.from_pretrained(tiny_model_dir)
    data = examples_for(tok, 3)
    batch = collate(data, tok.pad_id)
    with torch.no_grad():
        want = float(sft_loss(model(batch["input_ids"], batch["attention_mask"]), batch["input_ids"],
                              batch["loss_mask"]))
    assert evaluate_loss(model, data, tok.pad_id, batch_size=2) == pytest.approx(want, rel=1e-5)


def load_train_sl():
    spec = importlib.util.spec_from_file_location("train_sl", REPO / "train_sl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remove_outputs_deletes_the_named_files_and_folders_only(tmp_path):
    """--force's cleanup (train_sl.py, train_pm.py, train_dpo.py): the named outputs, folders whole; others stay."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("w")
    for name in ("metrics.jsonl", "revisions.jsonl"):
        (tmp_path / name).write_text("{}\n")
    remove_outputs(tmp_path, ["model", "metrics.jsonl", "absent.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["revisions.jsonl"]


def test_train_sl_stage_end_to_end(tiny_model_dir, tmp_path):
    """Both halves on a tiny model: every output file, a loadable model, reuse on rerun, --data, --force."""
    train_sl = load_train_sl()
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nInsult me\nTell me a secret\n")
    out = tmp_path / "sl"
    argv = ["--model", str(tiny_model_dir), "--out", str(out), "--red-team", str(prompts), "--helpful", str(prompts),
            "--num-prompts", "3", "--num-helpful", "2", "--rounds", "1", "--max-new-tokens", "6", "--steps", "2",
            "--gen-batch-size", "2", "--max-len", "96", "--threads", "1"]
    train_sl.main(argv)
    for name in ("args.json", "revisions.jsonl", "helpful.jsonl", "metrics.jsonl", "model/done.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    revs = [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()]
    assert len(revs) == 3 and all(len(r["rounds"]) == 1 for r in revs)
    assert len((out / "helpful.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "args.json").read_text())["rounds"] == 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["phase"] == "sft"] == [1, 2]
    Transformer.from_pretrained(out / "model")
    done = json.loads((out / "model/done.json").read_text())
    assert done["steps"] == 2

    stamp = (out / "model/model.safetensors").stat().st_mtime_ns
    train_sl.main(argv)  # finished: reused, nothing regenerated or retrained
    assert (out / "model/model.safetensors").stat().st_mtime_ns == stamp
    assert [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()] == revs

    out2 = tmp_path / "sl2"
    train_sl.main(["--model", str(tiny_model_dir), "--out", str(out2), "--data", str(out / "revisions.jsonl"),
                   "--revisions", "final", "--steps", "1", "--threads", "1"])
    assert (out2 / "model/done.json").is_file() and not (out2 / "revisions.jsonl").exists()

    train_sl.main(argv + ["--only", "train", "--force"])
    assert (out / "model/model.safetensors").stat().st_mtime_ns != stamp
    assert [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()] == revs

    with pytest.raises(MinicaiError, match="no revisions file"):
        train_sl.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "empty"), "--only", "train"])
