"""The `finetune` entrypoint: compose + check the config, build the run's artifacts (prepared data,
base weights), then run the selected stages inside one MLflow run. Each stage reads files and
writes files in the run directory; they share nothing but the RunContext.

  finetune/config/checks.py    every config check, before any work
  finetune/data/prepare.py   prepared data  (cached by content hash)
  finetune/training/base.py      base weights   (a .ckpt, a converted HF folder, or the demo's pretrained base)
  STAGES below          plan, prepare, train, evaluate, merge, predict, export, in that order
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from finetune import rundir
from finetune.config import STAGES as STAGE_ORDER
from finetune.config import register, resolve
from finetune.data import check_input_files, load_tokenizer, prepare, read_predict_input
from finetune.errors import LaunchError, UserError
from finetune.model import check_run_adapter, release_graphs, setup_context
from finetune.runtime import (
    Interrupted,
    RunContext,
    earlier_runs,
    exit_code,
    init_worker,
    is_worker,
    launch,
    peak_rss_gb,
    quiet_libraries,
    rank,
    received,
    redact,
    redact_files,
    redact_logging,
    sigterm_as_interrupt,
    training_run_id,
    use_credentials,
    world_size,
    write_summary,
)
from finetune.stages.evaluate import evaluate
from finetune.stages.export import export
from finetune.stages.merge import merge
from finetune.stages.plan import plan
from finetune.stages.predict import predict
from finetune.stages.prepare import prepare_stage
from finetune.stages.train import train
from finetune.tracking import (
    Tracker,
    close_run,
    dataset_inputs,
    flatten,
    mark_failed,
    resolve_uri,
    start_system_metrics,
    stop_system_metrics,
    to_mlflow,
)
from finetune.training import check_fresh_run_dir, resolve_base, resume_point

log = logging.getLogger(__name__)
register()

# Stage name -> function(RunContext) -> figures for summary.json. Run in STAGE_ORDER whatever
# order `stages` lists them. Ranks other than 0 of a data-parallel job run `train` only.
STAGES = {"plan": plan, "prepare": prepare_stage, "train": train, "evaluate": evaluate, "merge": merge,
          "predict": predict, "export": export}
assert tuple(STAGES) == STAGE_ORDER


def given_keys() -> frozenset[str]:
    """Config keys set on the command line (`lora.rank=4` -> 'lora.rank'), to tell a user's explicit
    choice from a default (adapter.lora_settings)."""
    if not HydraConfig.initialized():
        return frozenset()
    return frozenset(o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)


def artifacts(cfg, tracker, run_dir: Path, verbose: bool) -> tuple:
    """(tokenizer, prepared-data folder, base checkpoint, how the base was obtained), built once per
    job; (None, None, None, None) for a plan-only run, which needs no data or weights."""
    if list(cfg.stages) == ["plan"]:
        return None, None, None, None
    quiet_libraries(run_dir, rank(), verbose)   # before MindFormers is first imported
    tok = load_tokenizer(cfg.model.tokenizer.kind, cfg.model.tokenizer.path, cfg.model.tokenizer.chat_template)
    setup_context(cfg.hardware, cfg.seed)
    prepared = prepare(cfg, tok)
    base, how = resolve_base(cfg, tok, prepared, tracker)
    return tok, prepared, base, how


def start_up_checks(cfg, run_dir: Path, given: frozenset[str]) -> None:
    """What can be checked before any data is prepared or model built: input files exist and parse,
    the adapter a stage will use agrees with any lora.* override, a resume has a checkpoint to
    resume from with the same LoRA settings."""
    check_input_files(cfg)
    if "predict" in cfg.stages and cfg.predict.input:
        read_predict_input(cfg.predict.input, cfg.dataset.name, cfg.dataset.style, cfg.dataset.encoding)   # one line naming the record, not after training
    check_run_adapter(cfg, run_dir, given)
    if "train" in cfg.stages:
        resume_point(cfg, run_dir) if cfg.train.resume else check_fresh_run_dir(cfg, run_dir)


def run(cfg: DictConfig, run_dir: Path, given: frozenset[str] = frozenset(), verbose: bool = False) -> dict:
    """Run cfg.stages in order; returns this run's summary (also written to run_dir/summary.json).
    One process plays one of three roles: the launcher of a multi-device job (re-starts itself as
    msrun workers and waits), a worker of rank > 0 (trains its shard, records nothing), or rank 0
    (a single-device job, or worker 0: runs every stage inside the MLflow run and records the end).
    verbose: MindFormers' own log lines on the terminal too (hydra.verbose=true)."""
    cfg = resolve(cfg)                # checked, HF config.json applied, read-only
    run_dir = Path(run_dir)
    if cfg.tracking.uri:
        use_credentials(cfg.tracking.uri)   # for MLflow (and msrun workers), out of every file and line
    # Hydra wrote the config and command line as given: mask any secret before they are kept or logged
    redact_files(run_dir / ".hydra", run_dir.parent / "multirun.yaml")
    if world_size(cfg.parallel) > 1 and not is_worker() and list(cfg.stages) != ["plan"]:
        return launcher(cfg, run_dir, given, verbose)
    worker_rank = init_worker(cfg.hardware, cfg.seed) if is_worker() else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if worker_rank != 0:
        return worker(cfg, run_dir, given, verbose, worker_rank)
    return rank0(cfg, run_dir, given, verbose)


def launcher(cfg, run_dir: Path, given: frozenset[str], verbose: bool) -> dict:
    """Check and build the artifacts once, here (the workers find data and base in the cache), then
    start msrun; rank 0 among the workers tracks the run and writes the summary."""
    start_up_checks(cfg, run_dir, given)
    artifacts(cfg, Tracker(), run_dir, verbose)
    try:
        return launch(cfg, run_dir)
    except LaunchError as e:
        if cfg.parallel.node_rank == 0:
            mark_failed(run_dir / rundir.SUMMARY, e)
        raise


def worker(cfg, run_dir: Path, given: frozenset[str], verbose: bool, worker_rank: int) -> dict:
    """A worker of rank > 0: its shard of training, nothing tracked (Tracker() logs nothing)."""
    tok, prepared, base, _ = artifacts(cfg, Tracker(), run_dir, verbose)
    train(RunContext(cfg, run_dir, prepared, base, tok, Tracker(), worker_rank, given))
    return {}


def rank0(cfg, run_dir: Path, given: frozenset[str], verbose: bool) -> dict:
    """Open the MLflow run, record RUNNING, run the stages, and record the end whatever happens."""
    output_root = Path(cfg.output_root).resolve()
    uri = resolve_uri(cfg.tracking, output_root)   # an http(s) server must answer first
    summary_path = run_dir / rundir.SUMMARY
    tracker = Tracker(uri, cfg.tracking.experiment, cfg.tracking.run_name or run_dir.name,
                      artifact_root=output_root / "mlartifacts" if not cfg.tracking.uri else None,
                      tags={"dataset": cfg.dataset.name, "model": cfg.model.name,
                            "hardware": cfg.hardware.device_target, "stages": ",".join(cfg.stages),
                            "run_dir": str(run_dir)},
                      resume_run_id=training_run_id(summary_path, uri) if "train" in cfg.stages and cfg.train.resume
                      else None)
    summary = {"status": "RUNNING", "stages": list(cfg.stages), "mlflow_run_id": tracker.run_id, "mlflow_uri": uri,
               "run_dir": str(run_dir), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "runs": earlier_runs(summary_path)}
    write_summary(summary_path, summary)   # RUNNING: a run killed outright (SIGKILL) is not mistaken for an earlier one
    status, monitor = "FAILED", None
    with sigterm_as_interrupt():
        try:
            start_up_checks(cfg, run_dir, given)
            if cfg.tracking.system_metrics and "train" in cfg.stages:
                monitor = start_system_metrics(tracker, cfg.tracking.system_metrics_interval)
            run_stages(cfg, run_dir, given, verbose, tracker, summary)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as e:
            if received:   # the signal's exception was turned into another one (e.g. inside a C extension's import)
                status = "KILLED"
                raise Interrupted(received[-1]) from None
            tracker.set_tags({"error": redact(e)[:1000]})
            summary["error"] = redact(e)[:1000]
            raise
        finally:
            stop_system_metrics(monitor)
            close_run(cfg, run_dir, summary, tracker, status)
    return summary


def run_stages(cfg, run_dir: Path, given: frozenset[str], verbose: bool, tracker, summary: dict) -> None:
    """Params and config logged, artifacts built, then each selected stage in STAGES order; their
    figures, seconds and peak memory go into `summary`."""
    tracker.log_params(flatten(OmegaConf.to_container(cfg)))
    (run_dir / rundir.RESOLVED_CONFIG).write_text(redact(OmegaConf.to_yaml(cfg)))
    t0 = time.time()
    tok, prepared, base, how = artifacts(cfg, tracker, run_dir, verbose)
    summary["setup_peak_rss_gb"] = peak_rss_gb()   # tokenizer, prepared data, base weights
    if prepared is not None:   # what the run trains and is scored on, with content digests
        inputs = dataset_inputs(cfg, prepared)
        tracker.log_inputs(to_mlflow(inputs))
        summary["datasets"] = {d["name"]: {"digest": d["digest"], "context": d["context"], "rows": len(d["frame"]),
                                           "source": d["source"]} for d in inputs}
    if base is not None:
        summary.update(base_checkpoint=str(base), base_source=how)
        tracker.set_tags({"base_checkpoint": str(base), "base_source": how})
    ctx = RunContext(cfg, run_dir, prepared, base, tok, tracker, 0, given)
    for name, stage in STAGES.items():
        if name in cfg.stages:
            if name != "plan":
                release_graphs()   # the graphs of what ran before (the demo's base pretraining, a stage)
            t = time.time()
            summary.update(stage(ctx))
            summary[f"{name}_seconds"] = round(time.time() - t, 1)
            summary[f"{name}_peak_rss_gb"] = peak_rss_gb()
            tracker.flush()
    summary["seconds"] = round(time.time() - t0, 1)


# conf/ sits beside the package in the repository (an editable install), found by absolute path.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    """The `finetune` command. Folders Hydra creates itself (the run or sweep dir under
    output_root) are checked first: Hydra would stop on a file in their way with a traceback."""
    problem = output_path_problem(sys.argv[1:])
    if problem:
        print(f"finetune: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


def output_path_problem(argv: list[str]) -> str | None:
    """A one-line complaint if output_root, hydra.run.dir or hydra.sweep.dir (as given on the command
    line; output_root defaults to `outputs`) is, or lies under, something that is not a folder."""
    given = {"output_root": "outputs"}
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key in ("output_root", "hydra.run.dir", "hydra.sweep.dir") and "${" not in value:
            given[key] = value
    for key, value in given.items():
        path = Path(value).expanduser().absolute()
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    return f"{key}={value}: {p} is a file, not a folder; choose another {key}"
                break
    return None


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Thin: resolve the run dir, run, return cfg.sweep.objective (what a sweep optimizes).
    In a multirun sweep a failed job returns None (its MLflow run is FAILED) and the sweep goes on."""
    from finetune.tracking import in_multirun, objective_value

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = in_multirun()
    redact_logging()   # the terminal and the run's log file
    try:
        summary = run(cfg, run_dir, given_keys(), verbose=bool(HydraConfig.get().verbose))
    except UserError as e:
        # Known bad input or a failed worker: one line, no traceback (the MLflow run, if one was
        # opened, is marked FAILED).
        print(f"finetune: error: {redact(e)}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM: the run is marked KILLED, no traceback
        name, code = exit_code(e)
        print(f"finetune: interrupted by {name}; run {run_dir} marked KILLED", file=sys.stderr)
        sys.exit(code)
    except Exception:
        if not multirun:
            raise
        log.exception("job %s failed (its MLflow run is FAILED); the sweep goes on", run_dir.name)
        return None
    log.info("summary: %s", run_dir / rundir.SUMMARY)
    if not multirun:   # nothing to optimize: no sweeper warnings on a single run
        return None
    return objective_value(summary, cfg.sweep)
