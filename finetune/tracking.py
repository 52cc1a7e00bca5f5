"""MLflow tracking: one run per job; params = the flattened resolved config; the run is always
ended FINISHED or FAILED (never left RUNNING). A Tracker with no client is a no-op (tests)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

log = logging.getLogger("finetune.tracking")

MAX_PARAM_VALUE = 6000   # MLflow's limit on a param value's length
BATCH = 100              # MLflow's limit on params per log_batch call
FLUSH_EVERY = 50         # buffered metric points; step metrics keep their own step + timestamp


def default_uri(output_root: str | Path) -> str:
    return "sqlite:///" + str((Path(output_root) / "mlflow.db").resolve())


def flatten(d, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': '1', 'c': '[1, 2]'} (lists stay one value)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_VALUE]
    return out


class Tracker:
    def __init__(self, uri: str | None = None, experiment: str = "finetune", run_name: str | None = None,
                 artifact_root: Path | None = None, tags: dict | None = None):
        self.client, self.run_id, self._buffer = None, None, []
        if uri is None:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, str]) -> None:
        if not self.client:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._buffer.append(Metric(sanitize(k), float(v), now, step or 0))
        if len(self._buffer) >= FLUSH_EVERY or step is None:
            self.flush()

    def flush(self) -> None:
        if self.client and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
            self._buffer = []

    def set_tags(self, tags: dict) -> None:
        if self.client:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.client or not Path(path).exists():
            return
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        if not self.client:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)


def sanitize(name: str) -> str:
    """MLflow metric names allow alphanumerics and _ - . space / ; map anything else to _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)
