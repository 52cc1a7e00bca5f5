"""Where runs are recorded: the MLflow URI (default SQLite at output_root/mlflow.db), a check that a
tracking server answers before any work, the file lock that serializes writers of one SQLite store,
and the artifact folder beside a SQLite store."""
from __future__ import annotations

import contextlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from finetune.runtime.redact import redact, use_credentials

log = logging.getLogger(__name__)


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
    from finetune.errors import ConfigError

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
