"""The `finetune` entrypoint: compose + validate the config, then run the selected stages inside
one MLflow run. Each stage reads files and writes files in the run directory."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .schema import STAGES, ConfigError, register

log = logging.getLogger("finetune")
register()


def validate(cfg) -> None:
    """Cross-key checks that fail fast, before data or weights are touched."""
    from omegaconf.errors import MissingMandatoryValue

    from .data.prompts import STYLES

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: a value is required (e.g. {e.full_key}=...)") from None
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad or not cfg.stages:
        raise ConfigError(f"stages: unknown stage(s) {bad or '[]'}; choose from {list(STAGES)}")
    if cfg.dataset.style not in STYLES:
        raise ConfigError(f"dataset.style: expected one of {list(STYLES)}, got {cfg.dataset.style!r}")
    for key in ("train.epochs", "train.batch_size", "eval.batch_size", "parallel.gradient_accumulation_steps",
                "model.seq_length", "parallel.data_parallel", "parallel.model_parallel", "parallel.pipeline_stage",
                "parallel.micro_batch_num", "parallel.nodes"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}: expected >= 1, got {OmegaConf.select(cfg, key)}")
    if (cfg.parallel.model_parallel > 1 or cfg.parallel.pipeline_stage > 1) and cfg.stages != ["plan"]:
        raise ConfigError("parallel.model_parallel/pipeline_stage > 1: only data parallelism runs (LoRA on a "
                          "7B model fits one 64 GB device); such configs can be sized with stages=[plan]")
    if cfg.train.save.num_checkpoints < 0:
        raise ConfigError(f"train.save.num_checkpoints: expected >= 0, got {cfg.train.save.num_checkpoints}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size={cfg.model.hidden_size} is not divisible by "
                          f"model.num_heads={cfg.model.num_heads}")
    if cfg.hardware.compute_dtype == "float16" and cfg.hardware.loss_scale.kind == "none":
        raise ConfigError("hardware.loss_scale.kind: float16 compute needs a dynamic loss scale "
                          "(hardware.loss_scale.kind=dynamic), or gradients underflow silently")
    if cfg.eval.num_shots < 0:
        raise ConfigError(f"eval.num_shots: expected >= 0, got {cfg.eval.num_shots}")
    if cfg.predict.format not in ("jsonl", "npy"):
        raise ConfigError(f"predict.format: expected 'jsonl' or 'npy', got {cfg.predict.format!r}")


def check_input_files(cfg) -> None:
    """Input files named in the config must exist before any long work (training) starts.
    Called inside the tracked run, so a missing file is recorded as a FAILED run."""
    files = {"dataset.general.path": cfg.dataset.general.path if "prepare" in cfg.stages else None,
             "eval.squad.path": cfg.eval.squad.path if "evaluate" in cfg.stages else None,
             "eval.adapter": cfg.eval.adapter if {"evaluate", "merge", "predict", "export"} & set(cfg.stages) else None,
             "predict.input": cfg.predict.input if "predict" in cfg.stages else None}
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} not found")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run cfg.stages in order; returns the summary (also written to run_dir/summary.json)."""
    from .launch import SilentTracker, init_worker, is_worker, launch, local_workers, world_size
    from .model import resolve_model_config
    from .report import write_report
    from .tracking import Tracker, flatten, resolve_uri

    validate(cfg)
    resolve_model_config(cfg.model)   # an HF checkpoint's config.json defines the architecture
    local_workers(cfg.parallel)       # world size must split over the nodes
    if world_size(cfg.parallel) > 1 and not is_worker() and cfg.stages != ["plan"]:
        return launch(cfg, run_dir)   # msrun workers re-enter run(); rank 0 tracks and writes the summary
    rank = init_worker(cfg.hardware, cfg.seed) if is_worker() else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        os.environ["LOCAL_DEFAULT_PATH"] = str(run_dir / "mindformers" / f"rank{rank}")
        run_stages(cfg, run_dir, SilentTracker(), rank)
        return {}
    os.environ["LOCAL_DEFAULT_PATH"] = str(run_dir / "mindformers")  # MindFormers' logs + adapter_config.json
    output_root = Path(cfg.output_root).resolve()
    uri = resolve_uri(cfg.tracking, output_root)   # an http(s) server must answer first
    tracker = Tracker(uri, cfg.tracking.experiment, cfg.tracking.run_name or run_dir.name,
                      artifact_root=output_root / "mlartifacts" if not cfg.tracking.uri else None,
                      tags={"dataset": cfg.dataset.name, "model": cfg.model.name,
                            "hardware": cfg.hardware.device_target, "stages": ",".join(cfg.stages),
                            "run_dir": str(run_dir)})
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"status": "RUNNING", "stages": list(cfg.stages), "mlflow_run_id": tracker.run_id,
                    "mlflow_uri": uri, "run_dir": str(run_dir)})
    status = "FAILED"
    # SIGTERM (a scheduler's or `kill`'s stop) ends the run like Ctrl-C: status KILLED in summary.json
    # and MLflow, instead of a run left RUNNING forever by a process that died without cleanup.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        check_input_files(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        tracker.log_params(flatten(resolved))
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        summary.update(run_stages(cfg, run_dir, tracker))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        tracker.set_tags({"error": str(e)[:1000]})
        summary["error"] = str(e)[:1000]
        raise
    finally:
        summary["status"] = status
        write_json(summary_path, summary)
        write_report(run_dir, summary, tracker)   # CSV/PNG/report.md artifacts; never raises
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        for name, sub in (("acc", summary.get("per_subject_accuracy")),
                          ("acc_base", summary.get("per_subject_accuracy_base"))):
            if isinstance(sub, dict):
                tracker.log_metrics({f"{name}.{s}": v for s, v in sub.items()})
        tracker.log_artifact(summary_path)
        tracker.log_artifact(run_dir / "config_resolved.yaml")
        tracker.log_artifact(run_dir / ".hydra", "hydra")
        tracker.log_artifact(run_dir / "eval_predictions.jsonl")
        tracker.end(status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return summary


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


def _raise_interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_stages(cfg, run_dir: Path, tracker, rank: int = 0) -> dict:
    """Stage order is fixed (plan -> prepare -> train -> evaluate -> merge -> predict -> export),
    whatever order cfg.stages lists. Ranks other than 0 of a data-parallel job only train."""
    from .evaluate import evaluate
    from .model import setup_context
    from .predict import predict
    from .prepare import load_meta, prepare
    from .tokenizer import load_tokenizer
    from .train import train

    t0 = time.time()
    out: dict = {}
    if "plan" in cfg.stages:
        from .plan import plan

        out.update(plan(cfg, run_dir, tracker))
        if cfg.stages == ["plan"]:   # a dry run: no tokenizer, data or weights needed
            out["seconds"] = round(time.time() - t0, 1)
            return out
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path)
    setup_context(cfg.hardware, cfg.seed)
    # Every stage needs the prepared data; without the prepare stage it must already be cached
    # (prepare is cheap and deterministic, so it is (re)built rather than refused).
    prepared = prepare(cfg, tok)
    meta = load_meta(prepared)
    general = meta["general_examples"]   # rehearsal records mixed into training
    out.update({"prepared_data": str(prepared), "dataset_rows": meta["dataset_rows"],
                "train_questions": meta["train_questions"], "train_too_long": meta["train_too_long"],
                "general_examples": general})
    tracker.log_metrics({"train_questions": meta["train_questions"], "eval_questions_total": meta["eval_questions"],
                         "general_examples": general})
    if "train" in cfg.stages:
        out.update(train(cfg, run_dir, tok, prepared, tracker))
        tracker.flush()
    if rank != 0:
        return out
    if "evaluate" in cfg.stages:
        out.update(evaluate(cfg, run_dir, tok, prepared, tracker))
    if "merge" in cfg.stages:
        from .merge import merge

        out.update(merge(cfg, run_dir, tok, prepared, tracker))
    if "predict" in cfg.stages:
        out.update(predict(cfg, run_dir, tok, prepared, tracker))
    if "export" in cfg.stages:
        from .export import export

        out.update(export(cfg, run_dir, tok, prepared, tracker))
    out["seconds"] = round(time.time() - t0, 1)
    return out


# conf/ sits beside the package in the repository (an editable install), found by absolute path.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Thin: resolve the run dir, run, return cfg.sweep.objective (what a sweep optimizes).
    In a multirun sweep a failed job returns None (its MLflow run is FAILED) and the sweep goes on."""
    from .data.records import DataError
    from .launch import LaunchError
    from .model import ModelError
    from .sweep import in_multirun, objective_value
    from .tokenizer import TokenizerError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = in_multirun()
    try:
        summary = run(cfg, run_dir)
    except (ConfigError, DataError, ModelError, TokenizerError) as e:
        # Known bad input: one line, no traceback (an MLflow run, if one was opened, is marked FAILED).
        print(f"finetune: error: {e}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(2)
    except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM: the run is marked KILLED, no traceback
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        print(f"finetune: interrupted by {name}; run {run_dir} marked KILLED", file=sys.stderr)
        sys.exit(128 + getattr(signal, name))
    except LaunchError as e:  # a worker died: msrun stopped the others; show that worker's error
        print(f"finetune: error: {e}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(1)
    except Exception:
        if not multirun:
            raise
        log.exception("job %s failed (its MLflow run is FAILED); the sweep goes on", run_dir.name)
        return None
    log.info("summary: %s", run_dir / "summary.json")
    if not multirun:   # nothing to optimize: no sweeper warnings on a single run
        return None
    return objective_value(summary, cfg.sweep)
