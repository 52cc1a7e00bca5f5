"""A real `mlflow server` (SQLite backend, local artifact root, free loopback port): a job logs to it and is
read back through the REST API; an unreachable server stops the job before any work (or, with
tracking.required=false, the job falls back to the local store and says where)."""
import contextlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.schema import TrackingConfig
from finetune.errors import ConfigError
from finetune.tracking.store import default_uri, resolve_uri, server_problem
from helpers import QUICK, free_port, kill_group, run_process, spawn

BIN = Path(sys.executable).parent
TINY = [*QUICK, "model.pretrain.epochs=0", "eval.limit=8"]   # a random-init base: this module has its own store


def rest(uri: str, path: str, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with its store and artifacts in tmp, answering /health."""
    log = open(tmp / "server.log", "a")
    proc = spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                  "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"],
                 cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240      # imports + creating the database take a while on a busy machine
    while server_problem(uri, timeout=2) is not None:
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """Kill the server's whole process group (uvicorn + its workers) at once: an outage, not a
    graceful shutdown (which takes uvicorn several seconds)."""
    kill_group(proc)


@contextlib.contextmanager
def running_server(tmp: Path):
    """(uri, tmp, process) of a server started in tmp on a free port, killed at the end."""
    port = free_port()
    proc = start_server(tmp, port)
    try:
        yield f"http://127.0.0.1:{port}", tmp, proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def server(tmp_path_factory):
    """The server the module's tests share; none of them stops it (conftest marks its users `process`)."""
    with running_server(tmp_path_factory.mktemp("server")) as s:
        yield s


def _finetune(tmp: Path, args: list[str], run: str = "run") -> subprocess.CompletedProcess:
    cmd = [str(BIN / "finetune"), f"output_root={tmp}", f"hydra.run.dir={tmp / run}", *args]
    return run_process(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)


SECRET = "s3cretPW"


def _files_holding(folder: Path, needle: bytes) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and needle in f.read_bytes()]


def test_job_logs_to_the_server(server):
    """...with credentials in the URI (the server has no auth and ignores them): they reach MLflow
    and appear nowhere the run writes or prints — params, tags, config files, .hydra/, the report,
    the log, the artifacts, the server's database."""
    uri, tmp, _ = server
    with_password = uri.replace("http://", f"http://alice:{SECRET}@")
    proc = _finetune(tmp, [*TINY, "stages=[prepare,evaluate]", f"tracking.uri={with_password}", "tracking.experiment=srv"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert _files_holding(tmp, SECRET.encode()) == []      # run dir, server.db, artifacts, server.log
    assert (tmp / "run" / ".hydra" / "overrides.yaml").read_text().count("alice:***@") == 1
    s = json.loads((tmp / "run" / "summary.json").read_text())
    assert s["mlflow_uri"] == uri
    run = rest(uri, "runs/get", run_id=s["mlflow_run_id"])["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert metrics["mc_accuracy"] == s["mc_accuracy"]
    assert metrics["mc_accuracy_base"] == s["mc_accuracy_base"]
    assert metrics["trainable_ratio_pct"] == pytest.approx(s["trainable_ratio_pct"])
    assert params["eval.limit"] == "8" and params["tracking.uri"] == uri.replace("http://", "http://alice:***@")
    exp = rest(uri, "experiments/get-by-name", experiment_name="srv")["experiment"]
    assert exp["experiment_id"] == run["info"]["experiment_id"]
    # Artifacts go through the server (proxied) into its --artifacts-destination, not the job's folder.
    files = {f["path"] for f in rest(uri, "artifacts/list", run_id=s["mlflow_run_id"])["files"]}
    assert {"summary.json", "config_resolved.yaml"} <= files
    stored = tmp / "artifacts" / exp["experiment_id"] / s["mlflow_run_id"] / "artifacts" / "summary.json"
    assert json.loads(stored.read_text())["mc_accuracy"] == s["mc_accuracy"]
    assert not (tmp / "mlflow.db").exists()          # nothing went to the local store


@pytest.mark.process
def test_unreachable_server_stops_the_job_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"        # nothing listens there
    proc = _finetune(tmp_path, [*TINY, f"tracking.uri={uri}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"finetune: error: tracking.uri: no MLflow server at {uri} (")
    assert errors[0].endswith("start one with `make mlflow-server`, or set tracking.required=false to log locally")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()         # no data prepared, no model built
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "mlflow.db").exists()


def _tracking(uri, required):
    return OmegaConf.structured(TrackingConfig(uri=uri, required=required))


def test_required_false_falls_back_to_the_local_store_and_says_where(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    with_password = uri.replace("http://", f"http://bob:{SECRET}@")
    with caplog.at_level(logging.WARNING, logger="finetune.tracking"):
        assert resolve_uri(_tracking(with_password, False), tmp_path) == default_uri(tmp_path)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"no MLflow server at {uri}" in message and default_uri(tmp_path) in message and SECRET not in message
    with pytest.raises(ConfigError, match=f"^tracking.uri: no MLflow server at {uri} ") as e:
        resolve_uri(_tracking(with_password, True), tmp_path)
    assert SECRET not in str(e.value)
    # the credentials went to MLflow's own variables
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", SECRET)


def test_local_uris_are_not_probed(tmp_path):
    assert resolve_uri(_tracking(None, True), tmp_path) == default_uri(tmp_path)
    assert resolve_uri(_tracking("sqlite:////x/y.db", True), tmp_path) == "sqlite:////x/y.db"
    assert resolve_uri(_tracking("file:///x/mlruns", True), tmp_path) == "file:///x/mlruns"


def test_server_problem_names_what_answered(server):
    uri, _, _ = server
    assert server_problem(uri) is None
    assert server_problem(uri + "/") is None

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        other = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert server_problem(other) == f"GET {other}/health answered HTTP 404"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "refused" in server_problem(f"http://127.0.0.1:{free_port()}").lower()


def _metric_history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(int(m["step"]) for m in rest(uri, "metrics/get-history", run_id=run_id, metric_key=key,
                                                 max_results=1000).get("metrics", []))


def test_tracker_keeps_what_a_frozen_server_misses_and_sends_it_when_it_answers(server, monkeypatch, caplog):
    """The server stops answering (SIGSTOP: requests time out) in the middle of a run: each call
    waits at most MLFLOW_HTTP_REQUEST_TIMEOUT once, nothing is retried for minutes, and when the
    server answers again (SIGCONT) every kept point is sent, in order."""
    from finetune.tracking import tracker as tracking

    uri, _, proc = server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_EVERY", 0.0)
    t = tracking.Tracker(uri, "outage", "frozen")
    t.log_metrics({"loss": 1.0}, step=1)
    t.flush()
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        with caplog.at_level(logging.INFO, logger="finetune.tracking"):
            for step in range(2, 5):
                t.log_metrics({"loss": float(step)}, step=step)
                t.flush()
            assert t.offline and time.time() - t0 < 20
            t.set_tags({"during": "outage"})
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    with caplog.at_level(logging.INFO, logger="finetune.tracking"):
        t.log_metrics({"loss": 5.0}, step=5)
        t.flush()
        assert t.end("FINISHED") is None and not t.offline
    messages = [r.getMessage() for r in caplog.records]
    assert sum("stopped answering" in m for m in messages) == 1 and any("answers again" in m for m in messages)
    assert _metric_history(uri, t.run_id, "loss") == [1, 2, 3, 4, 5]
    got = rest(uri, "runs/get", run_id=t.run_id)["run"]
    assert got["info"]["status"] == "FINISHED"
    assert {tag["key"]: tag["value"] for tag in got["data"]["tags"]}["during"] == "outage"


def test_registry_on_the_server(server):
    """tracking.register_model on a real server: a new version of the name, tagged with the run's
    figures (the model here is a bare LoggedModel: what is tested is the registry, not the flavour)."""
    from mlflow.tracking import MlflowClient

    from finetune.tracking.logged_model import register

    uri, _, _ = server
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("srv") or client.get_experiment(client.create_experiment("srv"))
    run = client.create_run(exp.experiment_id)
    model = client.create_logged_model(exp.experiment_id, source_run_id=run.info.run_id, name="model")
    summary = {"mlflow_model_uri": f"models:/{model.model_id}", "mlflow_model_id": model.model_id,
               "mlflow_run_id": run.info.run_id, "mc_accuracy": 0.75, "retained": True, "contest_score": 0.8}
    assert register(summary, "server-mc", uri) == "1" and register(summary, "server-mc", uri) == "2"
    got = rest(uri, "model-versions/get", name="server-mc", version="2")["model_version"]
    assert {t["key"]: t["value"] for t in got["tags"]} == {"mc_accuracy": "0.75", "retained": "True",
                                                          "contest_score": "0.8"}


@pytest.fixture
def own_server(tmp_path_factory):
    """A server for one test (which may stop it), in a folder of its own."""
    with running_server(tmp_path_factory.mktemp("own-server")) as s:
        yield s


@pytest.mark.process
def test_a_server_outage_costs_no_training_and_loses_nothing(own_server, tmp_path):
    """The tracking server is killed at step 4 of 24 and stays down to the end of the job: training
    goes on (no minutes of retries), the job FINISHES, and what MLflow did not receive is kept in the
    run dir with one message; after the server restarts, `python -m finetune.tracking sync` delivers
    it: every step's loss, the final metrics and status. (A server of its own: it takes it down.)"""
    uri, store, server = own_server
    port = int(uri.rsplit(":", 1)[1])
    run = tmp_path / "run"
    cmd = [str(BIN / "finetune"), f"output_root={tmp_path}", f"hydra.run.dir={run}", *TINY, "stages=[prepare,train]",
           "train.epochs=4", "tracking.experiment=outage", f"tracking.uri={uri}"]
    err = open(tmp_path / "job.out", "w")
    job = spawn(cmd, cwd=tmp_path, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        log = run / "train_log.csv"
        while not (log.is_file() and len(log.read_text().splitlines()) > 4):
            assert job.poll() is None and time.time() < deadline, (tmp_path / "job.out").read_text()[-3000:]
            time.sleep(0.2)
        stop_server(server)
        stopped = time.time()
        job.wait(timeout=300)
        after_stop = time.time() - stopped
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        err.close()
    stderr = (tmp_path / "job.out").read_text()   # the job's terminal: stdout and stderr
    assert job.returncode == 0, stderr[-3000:]
    assert after_stop < 90, f"the job took {after_stop:.0f} s after the server stopped"
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["train_steps"] == 24
    pending = run / "mlflow_pending.json"
    assert s["tracking_pending"] == str(pending) and pending.is_file()
    lines = stderr.replace("\r", "\n").splitlines()
    assert sum("stopped answering (connection " in line and "training goes on" in line for line in lines) == 1
    assert sum(f"{run}/mlflow_pending.json holds what MLflow run" in line for line in lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr

    server = start_server(store, port)   # the same store, back
    try:
        proc = run_process([sys.executable, "-m", "finetune.tracking", "sync", str(pending)],
                           capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not pending.exists()
        got = rest(uri, "runs/get", run_id=s["mlflow_run_id"])["run"]
        assert got["info"]["status"] == "FINISHED"
        assert _metric_history(uri, s["mlflow_run_id"], "train_loss") == list(range(1, 25))
        metrics = {m["key"]: m["value"] for m in got["data"]["metrics"]}
        assert metrics["train_steps"] == 24 and metrics["train_loss_last"] == pytest.approx(s["train_loss_last"])
        files = {f["path"] for f in rest(uri, "artifacts/list", run_id=s["mlflow_run_id"])["files"]}
        assert {"summary.json", "config_resolved.yaml"} <= files
    finally:
        stop_server(server)
