"""MLflow tracking: one run per job; params = the flattened resolved config; the run is always
ended FINISHED or FAILED (never left RUNNING). A Tracker with no client is a no-op (tests).

Inside a multirun sweep (finetune/sweep.py) the sweep's callback opens a parent run and passes it
through the SWEEP_* environment variables below; a Tracker on the same store and experiment then
nests itself under that parent and tags its job number and overrides. Environment variables (not
objects) carry this because msrun workers, which do the logging of a multi-device job, are
separate processes started from the job."""
from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from .redact import redact, redact_params, use_credentials

log = logging.getLogger("finetune.tracking")

MAX_PARAM_VALUE = 6000   # MLflow's limit on a param value's length
BATCH = 100              # MLflow's limit on params per log_batch call
FLUSH_EVERY = 50         # buffered metric points; step metrics keep their own step + timestamp


# Set by finetune.sweep for the duration of a multirun (parent run) and of each job (job number, overrides).
SWEEP_PARENT_ENV = "FINETUNE_SWEEP_PARENT_RUN_ID"
SWEEP_URI_ENV = "FINETUNE_SWEEP_TRACKING_URI"
SWEEP_EXPERIMENT_ENV = "FINETUNE_SWEEP_EXPERIMENT"
SWEEP_NAME_ENV = "FINETUNE_SWEEP_NAME"
SWEEP_JOB_ENV = "FINETUNE_SWEEP_JOB"
SWEEP_OVERRIDES_ENV = "FINETUNE_SWEEP_OVERRIDES"

SERVER_TIMEOUT = 3.0     # seconds to wait for a tracking server's /health before giving up


def default_uri(output_root: str | Path) -> str:
    return "sqlite:///" + str((Path(output_root) / "mlflow.db").resolve())


def server_problem(uri: str, timeout: float = SERVER_TIMEOUT) -> str | None:
    """None if an MLflow server answers at `uri` (GET /health -> 200), else what went wrong.
    Checked before any work: MLflow's own client retries an unreachable server for minutes."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return None if r.status == 200 else f"GET {url} answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"GET {url} answered HTTP {e.code}"
    except urllib.error.URLError as e:
        return redact(e.reason)
    except (OSError, ValueError) as e:          # timeouts, resets, malformed URLs
        return redact(f"{type(e).__name__}: {e}")


def resolve_uri(tracking, output_root: str | Path) -> str:
    """The MLflow URI a job logs to: tracking.uri, or the sqlite store at output_root/mlflow.db.
    An http(s) server must answer first; if it does not, stop (tracking.required=true) or fall
    back to the local store and say where (tracking.required=false)."""
    from .schema import ConfigError

    # credentials in the URI go to MLflow's environment variables, never into a param or a message
    uri = use_credentials(tracking.uri) if tracking.uri else default_uri(output_root)
    if not uri.startswith(("http://", "https://")):
        return uri
    problem = server_problem(uri)
    if problem is None:
        return uri
    if tracking.required:
        raise ConfigError(f"tracking.uri: no MLflow server at {uri} ({problem}); start one with "
                          "`make mlflow-server`, or set tracking.required=false to log locally")
    local = default_uri(output_root)
    log.warning("tracking.uri: no MLflow server at %s (%s); tracking.required=false, so this run logs to "
                "the local store %s instead (open it with `mlflow ui --backend-store-uri %s`)",
                uri, problem, local, local)
    return local


def sqlite_artifact_root(uri: str) -> Path | None:
    """sqlite:////abs/dir/mlflow.db -> /abs/dir/mlartifacts: artifacts beside the database rather than
    in ./mlruns of whatever directory the job was started from."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"


def sweep_context(uri: str, experiment: str) -> dict:
    """The sweep's parent run id and this job's tags, when this process runs a job of a multirun
    sweep logging to the same store and experiment as the parent; {} otherwise."""
    parent = os.environ.get(SWEEP_PARENT_ENV)
    if not parent:
        return {}
    if os.environ.get(SWEEP_URI_ENV) != uri or os.environ.get(SWEEP_EXPERIMENT_ENV) != experiment:
        log.warning("sweep: this job logs to %s / experiment %r, not to the sweep's %s / %r; "
                    "it is not nested under the sweep's parent run %s", uri, experiment,
                    os.environ.get(SWEEP_URI_ENV), os.environ.get(SWEEP_EXPERIMENT_ENV), parent)
        return {}
    tags = {"mlflow.parentRunId": parent}
    if os.environ.get(SWEEP_JOB_ENV) is not None:
        tags["sweep_job"] = os.environ[SWEEP_JOB_ENV]
    if os.environ.get(SWEEP_OVERRIDES_ENV) is not None:
        tags["sweep_overrides"] = redact(os.environ[SWEEP_OVERRIDES_ENV])[:MAX_PARAM_VALUE]
    return {"parent": parent, "name": os.environ.get(SWEEP_NAME_ENV, "sweep"), "tags": tags}


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
            artifact_root = artifact_root or sqlite_artifact_root(uri)
            location = artifact_root.resolve().as_uri() if artifact_root else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        tags = {k: str(v) for k, v in (tags or {}).items()}
        sweep = sweep_context(uri, experiment)
        if sweep:
            tags.update(sweep["tags"])
            # A job's default name is its run dir's name, which in a sweep is just the job number;
            # with tracking.run_name set, every job would share the sweep's name.
            if run_name in (None, tags.get("sweep_job"), sweep["name"]):
                run_name = f"{sweep['name']}-{tags.get('sweep_job', '?')}"
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.uri = uri

    def log_params(self, params: dict[str, str]) -> None:
        if not self.client:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact_params(params).items()]
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
                self.client.set_tag(self.run_id, k, redact(v))

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
