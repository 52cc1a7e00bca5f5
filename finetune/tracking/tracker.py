"""MLflow tracking: one run per job; params = the flattened resolved config; the run is always
ended FINISHED or FAILED (never left RUNNING). A Tracker with no client is a no-op (tests).

Inside a multirun sweep (finetune/tracking/sweep.py) the sweep's callback opens a parent run and passes it
through the SWEEP_* environment variables below; a Tracker on the same store and experiment then
nests itself under that parent and tags its job number and overrides. Environment variables (not
objects) carry this because msrun workers, which do the logging of a multi-device job, are
separate processes started from the job."""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from finetune import rundir
from finetune.runtime.redact import redact, redact_params, use_credentials
from finetune.tracking.pending import write_pending
from finetune.tracking.store import sqlite_artifact_root, store_lock

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000   # MLflow's limit on a param value's length
BATCH = 100              # MLflow's limit on params per log_batch call
FLUSH_EVERY = 50         # buffered metric points; step metrics keep their own step + timestamp


# Set by finetune.tracking.sweep for the duration of a multirun (parent run) and of each job (job number, overrides).
SWEEP_PARENT_ENV = "FINETUNE_SWEEP_PARENT_RUN_ID"
SWEEP_URI_ENV = "FINETUNE_SWEEP_TRACKING_URI"
SWEEP_EXPERIMENT_ENV = "FINETUNE_SWEEP_EXPERIMENT"
SWEEP_NAME_ENV = "FINETUNE_SWEEP_NAME"
SWEEP_JOB_ENV = "FINETUNE_SWEEP_JOB"
SWEEP_OVERRIDES_ENV = "FINETUNE_SWEEP_OVERRIDES"


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


# A tracking server's calls must not hold training up: one attempt per call (MLflow's default is
# 7 retries with backoff, minutes for a server that is down) and a short timeout. Set for http(s)
# stores only, unless the user set them.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Errors with which a store that answered refuses a call (sending it again would not help)
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
            "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
RETRY_EVERY = 15.0       # seconds between attempts to reach a store that stopped answering


class Tracker:
    """One MLflow run. Every call after the run is created is kept when the store does not answer
    (a server restart, a network cut): the tracker goes offline, training goes on, and what it holds
    (metric points, params, tags, artifacts, the final status) is sent when the store answers again
    (tried at most every RETRY_EVERY seconds) — or, if it never does before the run ends, written to
    <run dir>/mlflow_pending.json, which `python -m finetune.tracking sync FILE` sends later."""

    def __init__(self, uri: str | None = None, experiment: str = "finetune", run_name: str | None = None,
                 artifact_root: Path | None = None, tags: dict | None = None, resume_run_id: str | None = None):
        """resume_run_id: continue that run (train.resume=true): reopened RUNNING, its step metrics
        continue where they stopped. If it is gone from the store, a new run tagged with its id."""
        self.client, self.run_id, self._buffer = None, None, []
        self.resumed = False
        self._skip_through = 0              # step metrics at or before this step are already logged
        self._pending: list[tuple] = []     # ("params" | "tags" | "artifact", payload) not yet sent
        self._offline_since: float | None = None
        self._last_try = 0.0
        self.problem: str | None = None     # the last error from the store, while offline
        if uri is None:
            return
        from mlflow.entities import RunTag
        from mlflow.tracking import MlflowClient

        if uri.startswith(("http://", "https://")):
            for k, v in HTTP_ENV.items():
                os.environ.setdefault(k, v)
        with store_lock(uri):   # jobs started together: one creates the store and the experiment
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifact_root = artifact_root or sqlite_artifact_root(uri)
                location = artifact_root.resolve().as_uri() if artifact_root else None
                try:
                    exp_id = self.client.create_experiment(experiment, artifact_location=location)
                except Exception:   # another job on a shared server created it first
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
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
        self.uri = uri
        if resume_run_id and self._reopen(resume_run_id):
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()
                                                     if not k.startswith("mlflow.")])
            return
        if resume_run_id:
            tags["resumed_from_run_id"] = resume_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id

    def _reopen(self, run_id: str) -> bool:
        """Continue an earlier run of this run dir: RUNNING again, the same id."""
        try:
            run = self.client.get_run(run_id)
        except Exception:   # deleted, or another store
            log.warning("tracking: MLflow run %s of the interrupted training is not in %s; a new run is opened, "
                        "tagged resumed_from_run_id", run_id, redact(self.uri))
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.run_id, self.resumed = run_id, True
        log.info("tracking: continuing MLflow run %s", run_id)
        return True

    def continue_steps(self, key: str) -> int:
        """On a reopened run: the last step already logged for step metric `key`; later step metrics
        at or before it are not logged again (a resumed run recomputes the steps after its
        checkpoint, which the interrupted run may have logged). 0 for a new run."""
        if not self.resumed:
            return 0
        try:
            history = self.client.get_metric_history(self.run_id, key)
        except Exception:
            return 0
        self._skip_through = max((m.step for m in history), default=0)
        return self._skip_through

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    @classmethod
    def attached(cls, uri: str, run_id: str) -> "Tracker":
        """A Tracker on an existing run (no experiment lookup, no new run): what `sync` replays into."""
        from mlflow.tracking import MlflowClient

        t = cls()
        t.uri = use_credentials(uri)
        t.client, t.run_id = MlflowClient(t.uri), run_id
        return t

    def send(self, kind: str, payload) -> None:
        """One call to the store now; raises if it does not answer (no buffering, no pending file)."""
        from mlflow.entities import Param

        if kind == "metrics":
            for i in range(0, len(payload), 1000):
                self.client.log_batch(self.run_id, metrics=payload[i:i + 1000])
        elif kind == "params":
            items = [Param(k, v) for k, v in payload.items()]
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + BATCH])
        elif kind == "tags":
            for k, v in payload.items():
                self.client.set_tag(self.run_id, k, v)
        elif kind == "artifact":
            path, artifact_path = payload
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        elif kind == "inputs":
            self.client.log_inputs(self.run_id, datasets=payload)
        elif kind == "status":
            self.client.set_terminated(self.run_id, status=payload)

    def _submit(self, kind: str, payload, force: bool = False) -> None:
        """Send in order: what is pending first. A failure keeps everything from it on."""
        self._pending.append((kind, payload))
        if self.offline and not force and time.time() - self._last_try < RETRY_EVERY:
            return
        self._last_try = time.time()
        while self._pending:
            kind_, payload_ = self._pending[0]
            try:
                self.send(kind_, payload_)
            except Exception as e:
                if getattr(e, "error_code", None) in REJECTED:   # the store answered no: not an outage
                    log.warning("tracking: MLflow refused %s for run %s: %s", kind_, self.run_id, short_error(e))
                    self._pending.pop(0)
                    continue
                # the store is unreachable: keep it, train on
                if not self.offline:
                    log.warning("tracking: %s stopped answering (%s); training goes on, and what would be logged "
                                "is kept and sent when it answers again", redact(self.uri), short_error(e))
                    self._offline_since = time.time()
                self.problem = short_error(e)
                return
            self._pending.pop(0)
        if self.offline:
            log.info("tracking: %s answers again after %.0f s; everything kept has been sent", redact(self.uri),
                     time.time() - self._offline_since)
            self._offline_since, self.problem = None, None

    def log_params(self, params: dict[str, str]) -> None:
        """On a reopened run (resume), params it already has are kept (MLflow does not change a
        param); the keys whose value changed are listed in the tag `resume_changed_params`."""
        if not self.client:
            return
        params = redact_params(params)
        if self.resumed:
            try:
                old = self.client.get_run(self.run_id).data.params
            except Exception:
                old = {}
            changed = sorted(k for k in params if k in old and old[k] != params[k])
            if changed:
                self.set_tags({"resume_changed_params": ", ".join(f"{k}={params[k]}" for k in changed)})
            params = {k: v for k, v in params.items() if k not in old}
        if params:
            self._submit("params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """model_id: the figures describe that logged MLflow model (shown on its page)."""
        if not self.client:
            return
        from mlflow.entities import Metric

        if step is not None and step <= self._skip_through:
            return
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._buffer.append(Metric(sanitize(k), float(v), now, step or 0, model_id=model_id))
        if len(self._buffer) >= FLUSH_EVERY or step is None:
            self.flush()

    def flush(self) -> None:
        if self.client and self._buffer:
            points, self._buffer = self._buffer, []
            self._submit("metrics", points)

    def set_tags(self, tags: dict) -> None:
        if self.client:
            self._submit("tags", {k: redact(v) for k, v in tags.items()})

    def log_inputs(self, datasets: list) -> None:
        """MLflow DatasetInput entities (finetune/tracking/lineage.py)."""
        if self.client and datasets:
            self._submit("inputs", list(datasets))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.client and Path(path).exists():
            self._submit("artifact", (str(path), artifact_path))

    def end(self, status: str, pending_dir: Path | None = None) -> Path | None:
        """Flush and close the run with `status`. If the store still does not answer, what it
        never received goes to pending_dir/mlflow_pending.json (returned), with one warning."""
        if not self.client:
            return None
        self.flush()
        self._submit("status", status, force=True)
        if not self._pending:
            return None
        if pending_dir is None:
            log.warning("tracking: %s did not answer; %d MLflow calls of run %s are lost (%s)", redact(self.uri),
                        len(self._pending), self.run_id, self.problem)
            return None
        path = Path(pending_dir) / rundir.PENDING
        write_pending(path, self.uri, self.run_id, self._pending)
        log.warning("tracking: %s did not answer (%s); %s holds what MLflow run %s has not received (%d metric "
                    "points, the final status %s); send it with `python -m finetune.tracking sync %s`",
                    redact(self.uri), self.problem, path, self.run_id,
                    sum(len(p) for k, p in self._pending if k == "metrics"), status, path)
        return path


def short_error(e: Exception) -> str:
    """An MLflow client error in a few words: the HTTP client's messages run to several hundred."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    for needle, say in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                        ("Name or service not known", "unknown host"), ("Connection reset", "connection reset")):
        if needle in text:
            return say
    return redact(text)[:200]


def sanitize(name: str) -> str:
    """MLflow metric names allow alphanumerics and _ - . space / ; map anything else to _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)
