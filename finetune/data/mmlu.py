"""MMLU reader: <root>/{dev,val,test}/<subject>_<split>.csv, no header, question,A,B,C,D,answer."""
from __future__ import annotations

from pathlib import Path

from .records import DataError, Question, check_root, load_csv, make_question, split_files

SPLITS = ("dev", "val", "test")
_WHAT = "question,A,B,C,D,answer"


def read_mmlu(path: str | Path) -> dict[str, list[Question]]:
    """Map each present split ("dev", "test" required, "val" optional) to its questions,
    sorted by (subject, row)."""
    root = check_root(path, "MMLU")
    out: dict[str, list[Question]] = {}
    for split in SPLITS:
        files = split_files(root, split, f"<subject>_{split}.csv", required=split != "val")
        if files is None:
            continue
        questions = []
        # Sort by subject, not file name: "x_dev.csv" vs "x_y_dev.csv" order can differ.
        for f in sorted(files, key=lambda f: _subject(f, split)):
            subject = _subject(f, split)
            df, lines = load_csv(f, header=None, width=6, what=_WHAT)
            for row, (values, line) in enumerate(zip(df.itertuples(index=False), lines)):
                questions.append(make_question("mmlu", split, subject, row, f"{f}:{line}", values))
        out[split] = questions
    return out


def _subject(f: Path, split: str) -> str:
    # The subject must match across splits (few-shot examples come from dev of the same
    # subject), so a file not following the naming scheme is an error, not a new subject.
    suffix = f"_{split}"
    if not f.stem.endswith(suffix) or f.stem == suffix:
        raise DataError(f"{f}: expected file name <subject>{suffix}.csv")
    return f.stem[: -len(suffix)]
