"""Tracking: the MLflow Tracker, the store and its lock, the pending file and sync, dataset lineage,
the logged model, system metrics, run and sweep reports, sweeps, compare.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.tracking.lineage import dataset_inputs, to_mlflow
from finetune.tracking.logged_model import log_merged_model
from finetune.tracking.run_end import close_run, mark_failed
from finetune.tracking.store import resolve_uri
from finetune.tracking.sweep import in_multirun, objective_value
from finetune.tracking.system_metrics import start_system_metrics, stop_system_metrics
from finetune.tracking.tracker import Tracker, flatten

__all__ = [
    "Tracker",
    "close_run",
    "dataset_inputs",
    "flatten",
    "in_multirun",
    "log_merged_model",
    "mark_failed",
    "objective_value",
    "resolve_uri",
    "start_system_metrics",
    "stop_system_metrics",
    "to_mlflow",
]
