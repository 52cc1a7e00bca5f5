"""<run dir>/train_log.csv: one row per optimizer step, written as training goes (so a killed run
keeps its curve) and read back by the train stage (losses, MLflow back-fill) and the run report."""
from __future__ import annotations

import math
from pathlib import Path

COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "loss_scale")


def open_log(log_file: Path | None, start: int):
    """The log opened for writing after step `start`; on resume, rows after the resumed step (written
    after the checkpoint by the interrupted run) are dropped so each step appears once."""
    if log_file is None:
        return None
    kept = [line for line in _lines(log_file)[1:] if int(line.split(",")[0]) <= start] if start > 0 else []
    f = open(log_file, "w")
    f.write(",".join(COLUMNS) + "\n" + "".join(line + "\n" for line in kept))
    return f


def format_row(row: dict) -> str:
    return ",".join(str(int(row["step"])) if c == "step" else f"{row[c]:.8g}" for c in COLUMNS) + "\n"


def read_rows(log_file: Path, first: int = 1, last: float = math.inf) -> list[dict]:
    """Rows of steps first..last as {column: number}; [] when the file is absent or empty."""
    lines = _lines(log_file)
    if not lines:
        return []
    header = lines[0].split(",")
    rows = [dict(zip(header, map(float, line.split(",")))) for line in lines[1:] if line]
    return [r for r in rows if first <= r["step"] <= last]


def _lines(log_file: Path) -> list[str]:
    return Path(log_file).read_text().splitlines() if Path(log_file).is_file() else []
