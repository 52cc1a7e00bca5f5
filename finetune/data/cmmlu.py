"""CMMLU reader: <root>/{dev,val,test}/<subject>.csv with header ",Question,A,B,C,D,Answer"."""
from __future__ import annotations

from pathlib import Path

from finetune.data.records import Question, check_root, load_csv, make_question, split_files

SPLITS = ("dev", "val", "test")
COLUMNS = ("Question", "A", "B", "C", "D", "Answer")  # the leading unnamed index column is ignored


def read_cmmlu(path: str | Path, encoding: str | None = None) -> dict[str, list[Question]]:
    """Map each present split ("dev", "test" required, "val" optional) to its questions,
    sorted by (subject, row)."""
    root = check_root(path, "CMMLU")
    out: dict[str, list[Question]] = {}
    for split in SPLITS:
        files = split_files(root, split, "<subject>.csv", required=split != "val")
        if files is None:
            continue
        out[split] = [q for f in sorted(files, key=lambda f: f.stem) for q in read_cmmlu_file(f, split, f.stem, encoding=encoding)]
    return out


def read_cmmlu_file(f: Path, split: str, subject: str, answer_required: bool = True,
                    encoding: str | None = None) -> list[Question]:
    """One CMMLU CSV. answer_required=False (predict's input): the Answer column is optional and
    not read; such questions carry the placeholder answer 'A', which nothing reads."""
    columns = COLUMNS if answer_required else COLUMNS[:-1]
    df, lines = load_csv(f, header=columns, width=None, what=",Question,A,B,C,D,Answer", encoding=encoding)
    answers = df["Answer"] if answer_required else ["A"] * len(df)
    return [make_question("cmmlu", split, subject, row, f"{f}:{line}", [*values, answer])
            for row, (values, answer, line) in enumerate(zip(df[list(COLUMNS[:-1])].itertuples(index=False),
                                                               answers, lines))]
