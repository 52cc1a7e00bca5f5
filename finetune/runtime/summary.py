"""<run dir>/summary.json, the run's record: status (RUNNING, then FINISHED, FAILED or KILLED), every
figure the stages return, per-stage time and peak memory, the MLflow run, and under `runs` each
earlier run of the same run dir, whole, oldest first."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from finetune import files

log = logging.getLogger(__name__)


def write_summary(path: Path, summary: dict) -> None:
    """Valid JSON whatever the figures: a NaN or infinite number (e.g. tokens/s of a run too short
    to time) is written as null, which JSON has, not as NaN, which it has not."""
    files.write_json(path, finite_or_null(summary), ensure_ascii=False, default=str, allow_nan=False)


def finite_or_null(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def read_summary(path: Path) -> dict | None:
    """The summary, or None when absent or not valid JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def earlier_runs(path: Path) -> list[dict]:
    """The runs a new run of this run dir keeps under `runs`: the old summary's own, then the old one."""
    old = read_summary(path)
    if old is None and path.is_file():
        log.warning("%s is not valid JSON; its earlier runs are not kept", path)
    return [] if old is None else old.pop("runs", []) + [old]


def training_run_id(path: Path, uri: str) -> str | None:
    """The MLflow run of the training that train.resume=true continues: the newest run of this run
    dir (summary.json, then its `runs` history) that trained and logged to the same store."""
    summary = read_summary(path)
    if summary is None:
        return None
    for run in [summary, *reversed(summary.get("runs", []))]:
        if "train" in run.get("stages", []) and run.get("mlflow_uri") == uri and run.get("mlflow_run_id"):
            return run["mlflow_run_id"]
    return None


def final_metrics(summary: dict) -> dict:
    """The numbers of a summary as MLflow metrics: booleans as 1/0 (retained), per-subject
    accuracies as acc.<subject> / acc_base.<subject>."""
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    for name, sub in (("acc", summary.get("per_subject_accuracy")),
                      ("acc_base", summary.get("per_subject_accuracy_base"))):
        if isinstance(sub, dict):
            out.update({f"{name}.{s}": v for s, v in sub.items()})
    return out
