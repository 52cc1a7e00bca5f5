"""MMLU reader: <root>/{dev,val,test}/<subject>_<split>.csv, no header, question,A,B,C,D,answer."""
from __future__ import annotations

from pathlib import Path

from finetune.data.records import DataError, Question, check_root, load_csv, make_question, split_files

SPLITS = ("dev", "val", "test")
_WHAT = "question,A,B,C,D,answer"


def read_mmlu(path: str | Path, encoding: str | None = None) -> dict[str, list[Question]]:
    """Map each present split ("dev", "test" required, "val" optional) to its questions,
    sorted by (subject, row)."""
    root = check_root(path, "MMLU")
    out: dict[str, list[Question]] = {}
    for split in SPLITS:
        files = split_files(root, split, f"<subject>_{split}.csv", required=split != "val")
        if files is None:
            continue
        # Sort by subject, not file name: "x_dev.csv" vs "x_y_dev.csv" order can differ.
        out[split] = [q for f in sorted(files, key=lambda f: _subject(f, split))
                      for q in read_mmlu_file(f, split, _subject(f, split), encoding=encoding)]
    return out


def read_mmlu_file(f: Path, split: str, subject: str, answer_required: bool = True,
                   encoding: str | None = None) -> list[Question]:
    """One MMLU CSV. answer_required=False (predict's input) also takes 5 columns; the answer, if
    any, is then not read: such questions carry the placeholder answer 'A', which nothing reads."""
    df, lines = load_csv(f, header=None, width=None if not answer_required else 6, what=_WHAT, encoding=encoding)
    if df.shape[1] not in ((6,) if answer_required else (5, 6)):
        raise DataError(f"{f}:{lines[0]}: expected {'6' if answer_required else '5 or 6'} columns "
                        f"({_WHAT if answer_required else 'question,A,B,C,D[,answer]'}), found {df.shape[1]}")
    return [make_question("mmlu", split, subject, row, f"{f}:{line}",
                          list(values) if answer_required else [*list(values)[:5], "A"])
            for row, (values, line) in enumerate(zip(df.itertuples(index=False), lines))]


def _subject(f: Path, split: str) -> str:
    # The subject must match across splits (few-shot examples come from dev of the same
    # subject), so a file not following the naming scheme is an error, not a new subject.
    suffix = f"_{split}"
    if not f.stem.endswith(suffix) or f.stem == suffix:
        raise DataError(f"{f}: expected file name <subject>{suffix}.csv")
    return f.stem[: -len(suffix)]
