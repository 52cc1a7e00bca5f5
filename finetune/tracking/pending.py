"""The pending file: MLflow calls a run could not make while its store was away, kept in order in
<run dir>/mlflow_pending.json and replayed by `python -m finetune.tracking sync` (finetune/tracking/sync.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from finetune.files import write_json

log = logging.getLogger(__name__)



def write_pending(path: Path, uri: str, run_id: str, pending: list[tuple]) -> None:
    """The calls a run could not make, in order, as JSON (metric points as key/value/timestamp/step)."""

    calls = []
    for kind, payload in pending:
        if kind == "metrics":
            payload = [[m.key, m.value, m.timestamp, m.step, m.model_id] for m in payload]
        elif kind == "inputs":
            payload = [d.to_dictionary() for d in payload]
        calls.append([kind, payload])
    write_json(path, {"uri": uri, "run_id": run_id, "calls": calls}, indent=0)


def read_pending(path: Path) -> tuple[str, str, list[tuple]]:
    """(uri, run_id, calls) of a pending file, the calls' payloads as MLflow objects again."""
    import json

    from mlflow.entities import DatasetInput, Metric

    data = json.loads(Path(path).read_text())
    calls = []
    for kind, payload in data["calls"]:
        if kind == "metrics":
            payload = [Metric(k, v, ts, step, model_id=model_id) for k, v, ts, step, model_id in payload]
        elif kind == "artifact":
            payload = tuple(payload)
        elif kind == "inputs":
            payload = [DatasetInput.from_dictionary(d) for d in payload]
        calls.append((kind, payload))
    return data["uri"], data["run_id"], calls
