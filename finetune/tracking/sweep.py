"""Multirun sweeps as one MLflow parent run with a nested child run per job.

`finetune -m lora.rank=4,8,16 optimizer.learning_rate=1e-4,5e-5` (grid, Hydra's basic sweeper) or
`finetune -m hydra/sweeper=finetune_optuna` (Optuna) runs every job in this process, one after
another. SweepCallback (listed under hydra.callbacks in conf/config.yaml):
  on_multirun_start  checks the tracking store, opens the parent run (named after the sweep, the
                     sweep's overrides as params) and exports its id for the jobs' Trackers;
  on_job_start       exports the job number and overrides, which the job's Tracker tags;
  on_multirun_end    picks the best child by cfg.sweep.* and tags/copies it onto the parent.
A job that fails is marked FAILED by app.run and returns None (app.main), so the sweep goes on.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from finetune.errors import ConfigError
from finetune.runtime.redact import redact, redact_files
from finetune.tracking.store import resolve_uri
from finetune.tracking.sweep_report import write_sweep_report
from finetune.tracking.tracker import (
    MAX_PARAM_VALUE,
    SWEEP_EXPERIMENT_ENV,
    SWEEP_JOB_ENV,
    SWEEP_NAME_ENV,
    SWEEP_OVERRIDES_ENV,
    SWEEP_PARENT_ENV,
    SWEEP_URI_ENV,
    Tracker,
)

log = logging.getLogger(__name__)

SWEEP_ENVS = (SWEEP_PARENT_ENV, SWEEP_URI_ENV, SWEEP_EXPERIMENT_ENV,
              SWEEP_NAME_ENV, SWEEP_JOB_ENV, SWEEP_OVERRIDES_ENV)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def retained(metrics: dict, params: dict) -> bool | None:
    """Whether a run kept its SQuAD ability, from its logged metrics (the boolean `retained` of
    summary.json is not a metric); None when SQuAD was not measured on both base and tuned model.
    Same rule as evaluate: finetune.evaluation.squad.retention with the run's eval.retention_threshold."""
    keys = ("squad_f1", "squad_em", "squad_f1_base", "squad_em_base")
    if not all(k in metrics for k in keys):
        return None
    from finetune.evaluation.squad import retention

    threshold = float(params.get("eval.retention_threshold", 0.9))
    return retention({"f1": metrics["squad_f1"], "exact_match": metrics["squad_em"]},
                     {"f1": metrics["squad_f1_base"], "exact_match": metrics["squad_em_base"]},
                     threshold)["retained"]


def objective_value(summary: dict, sweep) -> float | None:
    """What a job returns to the sweeper: summary[sweep.objective], or None when it is missing or
    not finite, or when sweep.require_retained and SQuAD retention was measured and failed.
    None (not nan) because hydra-optuna-sweeper 1.3 records a None return as a FAILED trial and
    goes on, while a nan makes its study.tell raise and ends the sweep."""
    value = summary.get(sweep.objective)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        log.warning("sweep: objective %s not in this job's summary (%r): the job counts as failed",
                    sweep.objective, value)
        return None
    if sweep.require_retained and summary.get("retained") is False:
        log.warning("sweep: SQuAD retention failed and sweep.require_retained=true: this job's %s=%.4f "
                    "is not offered to the sweeper", sweep.objective, value)
        return None
    return float(value)


def pick_best(children: list[dict], objective: str, direction: str = "maximize",
              require_retained: bool = True) -> tuple[dict | None, dict]:
    """children: [{"run_id", "status", "metrics": {...}, "params": {...}}] -> (best or None, counts).
    Eligible: FINISHED, a finite objective metric, and (require_retained) not a measured retention
    failure. Ties go to the earliest child in the list (the lower job number)."""
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"sweep.direction: expected 'maximize' or 'minimize', got {direction!r}")
    counts = {"children": len(children), "finished": 0, "failed": 0, "not_retained": 0, "no_objective": 0}
    best, best_value = None, None
    for child in children:
        if child["status"] != "FINISHED":
            counts["failed" if child["status"] == "FAILED" else "no_objective"] += 1
            continue
        counts["finished"] += 1
        value = child["metrics"].get(objective)
        if value is None or not math.isfinite(value):
            counts["no_objective"] += 1
            continue
        if require_retained and retained(child["metrics"], child["params"]) is False:
            counts["not_retained"] += 1
            continue
        better = best is None or (value > best_value if direction == "maximize" else value < best_value)
        if better:
            best, best_value = child, value
    return best, counts


def sweep_params(config) -> dict[str, str]:
    """The sweep's definition as MLflow params: the command-line overrides (`lora.rank=4,8` ->
    {'lora.rank': '4,8'}) and, for Optuna, its search space (hydra.sweeper.params)."""
    from omegaconf import OmegaConf

    params: dict[str, str] = {}
    space = OmegaConf.select(config, "hydra.sweeper.params")
    for key, value in (space or {}).items():
        params[str(key)] = str(value)
    for override in config.hydra.overrides.task:
        key, _, value = str(override).partition("=")
        params[key] = value          # the command line wins over the preset, as in the Optuna sweeper
    return {k: v[:MAX_PARAM_VALUE] for k, v in params.items()}


def list_children(client, experiment_id: str, parent_id: str) -> list[dict]:
    """Every child run of the parent, oldest first (= job order)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
             "metrics": dict(r.data.metrics), "params": dict(r.data.params),
             "job": r.data.tags.get("sweep_job"), "overrides": r.data.tags.get("sweep_overrides")} for r in runs]


class SweepCallback(Callback):
    """Configured under hydra.callbacks; Hydra builds one per `finetune -m` process."""

    def __init__(self) -> None:
        self.parent = None      # the parent's Tracker while the sweep runs

    def on_multirun_start(self, config, **kwargs) -> None:
        output_root = Path(config.output_root).resolve()
        try:
            uri = resolve_uri(config.tracking, output_root)
        except ConfigError as e:
            # Before any job: one line and exit 2, as a single run would (nothing was logged).
            print(f"finetune: error: {redact(e)}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        name = config.tracking.run_name or f"sweep-{sweep_dir.name}"
        sweeper = str(config.hydra.sweeper._target_).rsplit(".", 1)[-1]
        self.parent = Tracker(uri, config.tracking.experiment, name, tags={
            "sweep_dir": str(sweep_dir), "sweeper": sweeper, "objective": config.sweep.objective,
            "direction": config.sweep.direction, "require_retained": config.sweep.require_retained})
        self.parent.log_params(sweep_params(config))
        os.environ.update({SWEEP_PARENT_ENV: self.parent.run_id, SWEEP_URI_ENV: uri,
                           SWEEP_EXPERIMENT_ENV: config.tracking.experiment,
                           SWEEP_NAME_ENV: name})
        atexit.register(self._abandon)
        log.info("sweep %s: parent MLflow run %s in %s (experiment %r)", name, self.parent.run_id, uri,
                 config.tracking.experiment)

    def on_job_start(self, config, **kwargs) -> None:
        if self.parent is None:       # a single run, or a sweep whose parent could not be opened
            return
        os.environ[SWEEP_JOB_ENV] = str(config.hydra.job.num)
        os.environ[SWEEP_OVERRIDES_ENV] = ",".join(str(o) for o in config.hydra.overrides.task)

    def on_multirun_end(self, config, **kwargs) -> None:
        redact_files(Path(config.hydra.sweep.dir) / "multirun.yaml")   # the sweep's command line, secrets masked
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        for env in SWEEP_ENVS:
            os.environ.pop(env, None)
        status = "FAILED"
        try:
            status = finish_parent(parent, config.sweep, Path(config.hydra.sweep.dir) / "sweep_report",
                                   importances="optuna" in str(config.hydra.sweeper._target_).lower())
        finally:
            parent.end(status)

    def _abandon(self) -> None:
        """The sweep ended without on_multirun_end (Hydra raised, or the process was interrupted):
        never leave the parent RUNNING."""
        if self.parent is not None:
            self.parent.set_tags({"error": "the sweep stopped before all its jobs ended"})
            self.parent.end("FAILED")
            self.parent = None


def register_best(parent, best: dict, experiment_id: str, name: str) -> str | None:
    """sweep.register_best: the best child's logged model as a new version of `name` (tagged with
    its figures); the parent run is tagged with the version."""
    from finetune.tracking.logged_model import register

    models = parent.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{best['run_id']}'")
    if not models:
        log.warning("sweep.register_best=%s: the best run %s logged no MLflow model (add merge to stages)", name,
                    best["run_id"])
        return None
    model = models[0]
    summary = {"mlflow_model_uri": f"models:/{model.model_id}", "mlflow_model_id": model.model_id,
               "mlflow_run_id": best["run_id"], **{k: best["metrics"][k] for k in ("mc_accuracy", "contest_score")
                                                  if k in best["metrics"]}}
    if "retained" in best["metrics"]:
        summary["retained"] = bool(best["metrics"]["retained"])
    version = register(summary, name, parent.uri)
    parent.set_tags({"registered_model": f"{name}/{version}"})
    return version


def finish_parent(parent, sweep, report_dir: Path | None = None, importances: bool = False) -> str:
    """Tag the parent with the best child (best_run, best_job, ...) and copy that child's metrics onto
    it; with report_dir, write the sweep's plots there and log them under the parent's `sweep/`
    (report.write_sweep_report); returns the parent's final status: FINISHED if any child
    finished, else FAILED."""
    client = parent.client
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    children = list_children(client, experiment_id, parent.run_id)
    if report_dir is not None and children:
        try:
            write_sweep_report(children, sweep.objective, report_dir, importances)
            parent.log_artifact(report_dir, "sweep")
        except Exception as e:   # plots are not worth failing a sweep for
            log.warning("sweep: no plots (%s)", e)
    best, counts = pick_best(children, sweep.objective, sweep.direction, sweep.require_retained)
    parent.set_tags({f"sweep_{k}": v for k, v in counts.items()})
    if best is None:
        parent.set_tags({"best_run": "none"})
        log.warning("sweep: no child run is eligible for best (%s)", counts)
    else:
        parent.set_tags({"best_run": best["run_id"], "best_run_name": best["run_name"],
                         "best_job": best["job"], "best_overrides": best["overrides"]})
        parent.log_metrics(best["metrics"])
        if sweep.get("register_best"):
            register_best(parent, best, experiment_id, sweep.register_best)
        log.info("sweep: best run %s (job %s: %s) %s=%.4f; %s", best["run_id"], best["job"], best["overrides"],
                 sweep.objective, best["metrics"][sweep.objective], counts)
    return "FINISHED" if counts["finished"] else "FAILED"
