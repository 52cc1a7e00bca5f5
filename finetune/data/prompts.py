"""Prompt formatting for multiple-choice exams (the usual MMLU k-shot protocol). Pure, no I/O
except write_alpaca_json."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .records import LETTERS, DataError, Question

STYLES = ("mmlu", "cmmlu")

_QUESTION = {"mmlu": ("{q}", "Answer:"), "cmmlu": ("题目：{q}", "答案是：")}
_HEADER = {
    "mmlu": "The following are multiple choice questions (with answers) about {s}.",
    "cmmlu": "以下是关于{s}的单项选择题，请直接给出正确答案的选项。",
}


def _check(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}, expected one of {STYLES}")


def format_question(q: Question, style: str) -> str:
    _check(style)
    first, last = _QUESTION[style]
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return first.format(q=q.question) + options + "\n" + last


def header(subject: str, style: str) -> str:
    _check(style)
    return _HEADER[style].format(s=subject.replace("_", " "))


def target(q: Question, style: str) -> str:
    _check(style)
    # MMLU scores the token " B" after "Answer:"; the Chinese prompt ends in a full-width
    # colon, after which no space is conventional.
    return (" " if style == "mmlu" else "") + q.answer


def _body(q: Question, style: str, shots: Sequence[Question]) -> str:
    """Everything after the header: worked shots, then the unanswered question."""
    return "".join(format_question(s, style) + target(s, style) + "\n\n" for s in shots) + format_question(q, style)


def build_prompt(q: Question, style: str, shots: Sequence[Question] = ()) -> str:
    return header(q.subject, style) + "\n\n" + _body(q, style, shots)


def to_alpaca(q: Question, style: str, shots: Sequence[Question] = ()) -> dict:
    """Alpaca record with instruction + "\\n\\n" + input + output == build_prompt(...) + target(...)."""
    return {
        "instruction": header(q.subject, style),
        "input": _body(q, style, shots),
        "output": target(q, style),
        "id": q.id,
        "subject": q.subject,
    }


def from_alpaca_prompt(rec: dict) -> str:
    return rec["instruction"] + "\n\n" + rec["input"]


def read_alpaca_json(path: str | Path, key: str, require_output: bool) -> list[dict]:
    """Alpaca records [{instruction, input?, output?, id?}] from a JSON list, checked one by one;
    errors name `key` (the config key that gave the path), the file and the record index."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: {path}: not a JSON file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise DataError(f"{key}: {path}: expected a JSON list of Alpaca records, got {type(data).__name__}")
    fields = ("instruction", "output") if require_output else ("instruction",)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(f), str) for f in fields):
            raise DataError(f"{key}: {path}: record [{i}]: expected an object with string "
                            + " and ".join(repr(f) for f in fields))
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"{key}: {path}: record [{i}]: 'input' must be a string")
    return data


def alpaca_prompt(rec: dict) -> str:
    """The prompt of an Alpaca record: instruction, then its input when it has one."""
    return from_alpaca_prompt(rec) if rec.get("input") else rec["instruction"]


def write_alpaca_json(records: list[dict], path: str | Path) -> None:
    """Write UTF-8 JSON atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # same dir, so os.replace is a rename, not a copy
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
