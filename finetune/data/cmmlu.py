"""CMMLU reader: <root>/{dev,val,test}/<subject>.csv with header ",Question,A,B,C,D,Answer"."""
from __future__ import annotations

from pathlib import Path

from .records import Question, check_root, load_csv, make_question, split_files

SPLITS = ("dev", "val", "test")
COLUMNS = ("Question", "A", "B", "C", "D", "Answer")  # the leading unnamed index column is ignored


def read_cmmlu(path: str | Path) -> dict[str, list[Question]]:
    """Map each present split ("dev", "test" required, "val" optional) to its questions,
    sorted by (subject, row)."""
    root = check_root(path, "CMMLU")
    out: dict[str, list[Question]] = {}
    for split in SPLITS:
        files = split_files(root, split, "<subject>.csv", required=split != "val")
        if files is None:
            continue
        questions = []
        for f in sorted(files, key=lambda f: f.stem):
            df, lines = load_csv(f, header=COLUMNS, width=None, what=",Question,A,B,C,D,Answer")
            for row, (values, line) in enumerate(zip(df[list(COLUMNS)].itertuples(index=False), lines)):
                questions.append(make_question("cmmlu", split, f.stem, row, f"{f}:{line}", values))
        out[split] = questions
    return out
