"""MLflow tracking: one run per job; params = the flattened resolved config; the run is always
ended FINISHED or FAILED (never left RUNNING). A Tracker with no client is a no-op (tests).

Inside a multirun sweep (finetune/sweep.py) the sweep's callback opens a parent run and passes it
through the SWEEP_* environment variables below; a Tracker on the same store and experiment then
nests itself under that parent and tags its job number and overrides. Environment variables (not
objects) carry this because msrun workers, which do the logging of a multi-device job, are
separate processes started from the job."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def store_lock(uri: str):
    """For a SQLite store: an exclusive lock (flock on <db>.lock) while the store is opened. The first
    open creates and migrates the database; two processes doing that at once fail ("duplicate
    column name: step"). Other stores: no lock (a server serializes its own)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


# A tracking server's calls must not hold training up: one attempt per call (MLflow's default is
# 7 retries with backoff, minutes for a server that is down) and a short timeout. Set for http(s)
# stores only, unless the user set them.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Errors with which a store that answered refuses a call (sending it again would not help)
REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
            "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
RETRY_EVERY = 15.0       # seconds between attempts to reach a store that stopped answering
PENDING_FILE = "mlflow_pending.json"


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

    def _send(self, kind: str, payload) -> None:
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
                self._send(kind_, payload_)
            except Exception as e:
                if getattr(e, "error_code", None) in REJECTED:   # the store answered no: not an outage
                    log.warning("tracking: MLflow refused %s for run %s: %s", kind_, self.run_id, _short(e))
                    self._pending.pop(0)
                    continue
                # the store is unreachable: keep it, train on
                if not self.offline:
                    log.warning("tracking: %s stopped answering (%s); training goes on, and what would be logged "
                                "is kept and sent when it answers again", redact(self.uri), _short(e))
                    self._offline_since = time.time()
                self.problem = _short(e)
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
        """MLflow DatasetInput entities (finetune/lineage.py)."""
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
        path = Path(pending_dir) / PENDING_FILE
        write_pending(path, self.uri, self.run_id, self._pending)
        log.warning("tracking: %s did not answer (%s); %s holds what MLflow run %s has not received (%d metric "
                    "points, the final status %s); send it with `python -m finetune.tracking sync %s`",
                    redact(self.uri), self.problem, path, self.run_id,
                    sum(len(p) for k, p in self._pending if k == "metrics"), status, path)
        return path


def _short(e: Exception) -> str:
    """An MLflow client error in a few words: the HTTP client's messages run to several hundred."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    for needle, say in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                        ("Name or service not known", "unknown host"), ("Connection reset", "connection reset")):
        if needle in text:
            return say
    return redact(text)[:200]


def write_pending(path: Path, uri: str, run_id: str, pending: list[tuple]) -> None:
    """The calls a run could not make, in order, as JSON (metric points as key/value/timestamp/step)."""
    import json

    calls = []
    for kind, payload in pending:
        if kind == "metrics":
            payload = [[m.key, m.value, m.timestamp, m.step, m.model_id] for m in payload]
        elif kind == "inputs":
            payload = [d.to_dictionary() for d in payload]
        calls.append([kind, payload])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"uri": uri, "run_id": run_id, "calls": calls}, indent=0))
    tmp.replace(path)


def sync(path: Path, uri: str | None = None) -> int:
    """Send a mlflow_pending.json to its run (at `uri`, default the one recorded); the file is
    removed once everything is sent. Returns the number of calls sent."""
    import json

    from mlflow.entities import Metric

    data = json.loads(Path(path).read_text())
    t = Tracker()
    from mlflow.tracking import MlflowClient

    t.uri = use_credentials(uri or data["uri"])
    t.client, t.run_id = MlflowClient(t.uri), data["run_id"]
    for kind, payload in data["calls"]:
        if kind == "metrics":
            payload = [Metric(k, v, ts, step, model_id=model_id) for k, v, ts, step, model_id in payload]
        elif kind == "artifact":
            payload = tuple(payload)
        elif kind == "inputs":
            from mlflow.entities import DatasetInput

            payload = [DatasetInput.from_dictionary(d) for d in payload]
        t._send(kind, payload)     # raises if the store still does not answer: the file stays
    Path(path).unlink()
    return len(data["calls"])


def sanitize(name: str) -> str:
    """MLflow metric names allow alphanumerics and _ - . space / ; map anything else to _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def main(argv=None) -> int:
    """python -m finetune.tracking sync <run dir>/mlflow_pending.json [--tracking-uri URI]"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m finetune.tracking",
                                description="send what a run could not log while its MLflow store was away")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send a run dir's mlflow_pending.json to its MLflow run")
    s.add_argument("file", type=Path)
    s.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the file")
    args = p.parse_args(argv)
    try:
        n = sync(args.file, args.tracking_uri)
    except Exception as e:
        print(f"finetune.tracking: error: {args.file}: {_short(e)}", file=sys.stderr)
        return 1
    print(f"sent {n} MLflow calls from {args.file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
