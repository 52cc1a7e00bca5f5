"""Shared record type, error type and CSV/encoding helpers for the exam readers."""
from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.errors import DataError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")

# CJK Unified Ideographs (+ extension A and compatibility block). Used to tell real GBK
# Chinese text from arbitrary bytes that GB18030 happens to decode without error.
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Question:
    id: str  # "dataset/split/subject/row", row = 0-based data row within the file
    subject: str
    question: str
    choices: tuple[str, str, str, str]  # texts of A, B, C, D
    answer: str  # one of LETTERS
    source: str  # "path/to/file.csv:LINE", LINE = 1-based editor line where the row starts


def read_bytes(path: str | Path) -> bytes:
    """A data file's bytes; a broken or looping symlink, a folder or an unreadable file is a DataError."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); expected a CSV file") from None


def looks_latin1(raw: bytes) -> bool:
    """Plausibly Latin-1 / cp1252 text rather than GBK: GBK writes every Chinese character as two
    bytes >= 0x81, so its non-ASCII bytes come in runs of two or more; Latin-1 text in a European
    language has mostly single accented letters between ASCII ones ("caf\xe9 cr\xe8me")."""
    runs = [len(m) for m in re.findall(rb"[\x80-\xff]+", raw)]
    return bool(runs) and sum(1 for n in runs if n == 1) > 0.5 * len(runs)


def read_text(path: str | Path, encoding: str | None = None) -> str:
    """Decode a data file: `encoding` when given (dataset.encoding); else UTF-8 (BOM stripped),
    else GBK/GB18030 when the bytes really are Chinese text and not plausibly Latin-1."""
    path = Path(path)
    raw = read_bytes(path)
    if encoding:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not {encoding} (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "check dataset.encoding") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        text = raw.decode("gb18030")  # superset of GBK, so covers both encodings in the wild
    except UnicodeDecodeError:
        text = None
    bad = utf8_error.object[utf8_error.start]
    where = f"{path}: not UTF-8 (byte 0x{bad:02x} at offset {utf8_error.start})"
    # GB18030 decodes many non-Chinese byte strings (e.g. Latin-1 "été") to stray
    # ideographs-or-symbols: it must contain a CJK ideograph and not look like Latin-1.
    if text is not None and _CJK.search(text):
        if looks_latin1(raw):
            raise DataError(f"{where}; it decodes as GBK but looks like Latin-1 text (single accented "
                            "letters); set dataset.encoding=latin-1 (or gbk, or re-save it as UTF-8)")
        log.warning("%s: not UTF-8, decoded as GBK/GB18030; consider re-saving it as UTF-8", path)
        return text
    raise DataError(f"{where} and not GBK/GB18030 text; re-save it as UTF-8, or set dataset.encoding")


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def load_csv(
    path: Path, *, header: tuple[str, ...] | None, width: int | None, what: str, encoding: str | None = None
) -> tuple[pd.DataFrame, list[int]]:
    """Parse `path` with pandas (all cells str, "None"/"NA" kept as text).

    `header`: None for headerless files, else the column names the header must contain.
    Returns the frame (header names stripped of spaces) and, per data row, the 1-based
    editor line where it starts (rows can span lines: MMLU questions contain quoted
    newlines). Every record must have `width` fields (default: as many as the header);
    `what` describes them for errors. pandas silently pads short rows with "", hence the
    field count check on a csv scan of the same text.
    """
    text = read_text(path, encoding)
    records = []  # (start line, fields) of each non-blank record, as pandas sees them
    reader = csv.reader(io.StringIO(text, newline=""))
    prev_end = 0
    try:
        for rec in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if rec and not (len(rec) == 1 and not rec[0].strip()):  # pandas skips blank lines
                records.append((start, rec))
    except csv.Error as e:
        raise DataError(f"{path}:{prev_end + 1}: malformed CSV ({_one_line(e)})") from None
    if not records:
        raise DataError(f"{path}: empty file, expected CSV rows of {what}")
    if header is not None:  # checked first: a missing column also makes every row "too long"
        names = [c.strip() for c in records[0][1]]
        for col in header:
            if col not in names:
                raise DataError(f"{path}:{records[0][0]}: header lacks column {col!r} (expected {what})")
    width = width or len(records[0][1])
    for line, rec in records:
        if len(rec) != width:
            raise DataError(f"{path}:{line}: expected {width} fields ({what}), found {len(rec)}")
    try:
        df = pd.read_csv(io.StringIO(text), header=None if header is None else 0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot parse CSV ({_one_line(e)}), expected rows of {what}") from None
    skip = 0 if header is None else 1
    lines = [line for line, _ in records[skip:]]
    if len(lines) != len(df):
        # csv and pandas disagree on record boundaries in some exotic quoting case;
        # fall back to a best guess rather than fail on otherwise readable data.
        lines = [i + 1 + skip for i in range(len(df))]
    if header is not None:
        df.columns = [str(c).strip() for c in df.columns]  # so ", Question, A" still matches
    return df, lines


def make_question(dataset: str, split: str, subject: str, row: int, source: str, values) -> Question:
    """Validate one row (question, A, B, C, D, answer) and build the Question."""
    question, a, b, c, d, answer = (str(v) for v in values)
    if not question.strip():
        raise DataError(f"{source}: empty question text")
    # Empty options are rejected: the real data has none (0 of 14,327 MMLU and 11,917
    # CMMLU rows), so an empty cell almost certainly means a mangled row (lost value or
    # shifted columns), and a prompt with a blank option would silently mis-train.
    for letter, text in zip(LETTERS, (a, b, c, d)):
        if not text.strip():
            raise DataError(f"{source}: empty text for option {letter}")
    # Only upper-case A-D (after stripping whitespace): the real data never deviates,
    # so anything else is a wrong column or a different answer format, not a typo to guess at.
    if answer.strip() not in LETTERS:
        raise DataError(f"{source}: answer must be one of A, B, C, D, found {answer!r}")
    # Stripped, as the standard harnesses do (963 MMLU test questions carry stray leading or
    # trailing whitespace that would otherwise reach the prompt).
    return Question(
        id=f"{dataset}/{split}/{subject}/{row}",
        subject=subject,
        question=question.strip(),
        choices=(a.strip(), b.strip(), c.strip(), d.strip()),
        answer=answer.strip(),
        source=source,
    )


def split_files(root: Path, split: str, pattern: str, *, required: bool) -> list[Path] | None:
    """Sorted CSVs of one split dir; None if an optional split is absent."""
    d = root / split
    if not d.is_dir():
        if required:
            raise DataError(f"{d}: missing '{split}' split directory (expected {d}/{pattern})")
        return None
    files = sorted(d.glob("*.csv"))
    if not files:
        raise DataError(f"{d}: no .csv files (expected {d}/{pattern})")
    return files


def check_root(path: str | Path, name: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: {name} data directory not found (expected dev/ and test/ inside)")
    return root


# Label value that the loss ignores (prompt tokens and padding); MindFormers' default.
IGNORE_ID = -100
