"""The end of a run, whatever its status: summary.json written, the run report made, final metrics,
the model registered (FINISHED only), artifacts logged, the MLflow run ended (or what the store did
not take kept in mlflow_pending.json). And the launcher's FAILED mark for a job whose worker died."""
from __future__ import annotations

import logging
from pathlib import Path

from finetune import rundir
from finetune.runtime.redact import redact
from finetune.runtime.summary import earlier_runs, final_metrics, read_summary, write_summary
from finetune.tracking.run_report import write_report

log = logging.getLogger(__name__)


def close_run(cfg, run_dir: Path, summary: dict, tracker, status: str) -> None:
    """Record the end of a rank-0 run. Never raises for a tracking problem: the run's own status stands."""
    path = run_dir / rundir.SUMMARY
    summary["status"] = status
    write_summary(path, summary)
    write_report(run_dir, summary, tracker)   # CSV/PNG/report.md artifacts; never raises
    tracker.log_metrics(final_metrics(summary), model_id=summary.get("mlflow_model_id"))
    if status == "FINISHED" and cfg.tracking.register_model and tracker.client:
        try:
            from finetune.tracking.logged_model import register

            summary["registered_model_version"] = register(summary, cfg.tracking.register_model, summary["mlflow_uri"])
            write_summary(path, summary)
        except Exception as e:
            log.warning("tracking.register_model=%s: not registered (%s)", cfg.tracking.register_model, redact(e))
    tracker.log_artifact(path)
    tracker.log_artifact(run_dir / rundir.RESOLVED_CONFIG)
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    if "evaluate" in summary["stages"]:
        tracker.log_artifact(run_dir / rundir.EVAL_PREDICTIONS)
    pending = tracker.end(status, run_dir)
    if pending is not None:   # the store was away at the end: say where the rest of the run is
        summary["tracking_pending"] = str(pending)
        write_summary(path, summary)


def mark_failed(summary_path: Path, error: Exception) -> None:
    """A data-parallel job whose worker died: rank 0 may have been killed before it could record
    anything, so the launcher marks the run FAILED in summary.json and in MLflow itself."""
    summary = read_summary(summary_path) or {"runs": earlier_runs(summary_path)}
    if summary.get("status") in ("FINISHED", "FAILED"):
        return   # rank 0 got as far as recording the end itself
    summary.update(status="FAILED", error=redact(error)[:1000])
    write_summary(summary_path, summary)
    if summary.get("mlflow_run_id") and summary.get("mlflow_uri"):
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(summary["mlflow_uri"])
            client.set_tag(summary["mlflow_run_id"], "error", redact(error)[:1000])
            client.set_terminated(summary["mlflow_run_id"], status="FAILED")
        except Exception as e:   # the tracking store is not what failed; say so and keep the original error
            log.warning("could not mark MLflow run %s FAILED: %s", summary["mlflow_run_id"], e)
