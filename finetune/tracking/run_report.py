"""Run artifacts worth opening: per-subject accuracy (CSV + bar chart), loss and learning-rate curves,
and report.md (what ran, figures, timings), plus the adapter and predictions, logged to MLflow.

Called once at the end of every run (finetune/tracking/run_end.py), so failed runs get a report too.
Everything here is best effort: a missing input skips that piece (report.md says which and why)
and a chart that cannot be drawn never fails the run."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from finetune import rundir
from finetune.training.train_log import read_rows

log = logging.getLogger(__name__)

ARTIFACT_DIR = "report"   # where the report's files go in the MLflow run


def subject_counts(predictions: Path) -> dict[str, int]:
    """Questions per subject in eval_predictions.jsonl ({} if the file is absent)."""
    counts: dict[str, int] = {}
    if predictions.is_file():
        for line in predictions.read_text(encoding="utf-8").splitlines():
            if line.strip():
                subject = json.loads(line).get("subject", "")
                counts[subject] = counts.get(subject, 0) + 1
    return counts


def accuracy_rows(summary: dict, counts: dict[str, int]) -> list[dict]:
    """One row per subject (sorted by name) + an 'ALL' row: subject, n, accuracy_base, accuracy.
    Values absent from the summary (no base evaluation, say) are None."""
    tuned = summary.get("per_subject_accuracy") or {}
    base = summary.get("per_subject_accuracy_base") or {}
    rows = [{"subject": s, "n": counts.get(s), "accuracy_base": base.get(s), "accuracy": tuned.get(s)}
            for s in sorted(set(tuned) | set(base))]
    if rows:
        rows.append({"subject": "ALL", "n": sum(counts.values()) if counts else None,
                     "accuracy_base": summary.get("mc_accuracy_base"), "accuracy": summary.get("mc_accuracy")})
    return rows


def write_accuracy_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["subject", "n", "accuracy_base", "accuracy"])
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    return path


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    """Grouped bars per subject: base (grey) beside tuned (blue); the 'ALL' row last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["subject"] for r in rows]
    x = np.arange(len(rows))
    has_base = any(r["accuracy_base"] is not None for r in rows)
    width = 0.4 if has_base else 0.6
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) + 2), 4.5))
    if has_base:
        ax.bar(x - width / 2, [r["accuracy_base"] or 0 for r in rows], width, label="base", color="#999999")
    ax.bar(x + (width / 2 if has_base else 0), [r["accuracy"] or 0 for r in rows], width,
           label="base + LoRA", color="#1f77b4")
    ax.axhline(0.25, color="#d62728", lw=0.8, ls="--", label="chance (4 options)")
    ax.set_xticks(x, names, rotation=60 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center",
                  fontsize=7 if len(rows) > 20 else 9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("multiple-choice accuracy per subject")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_train_log(path: Path) -> dict[str, list[float]]:
    """train_log.csv (step,loss,lr,...) -> {column: values}; {} when absent or without rows."""
    rows = read_rows(path)
    return {k: [r[k] for r in rows] for k in ("step", "loss", "lr") if k in rows[0]} if rows else {}


def plot_curves(curves: dict[str, list[float]], path: Path) -> Path:
    """Training loss and learning rate against the optimizer step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8))
    marker = "o" if len(curves["step"]) <= 20 else None   # a handful of steps: show the points
    ax_loss.plot(curves["step"], curves["loss"], marker=marker, color="#1f77b4")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    if "lr" in curves:
        ax_lr.plot(curves["step"], curves["lr"], marker=marker, color="#ff7f0e")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # steps are whole numbers
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# (summary key, label) for report.md's figures table, in order; absent keys are left out.
FIGURES = [
    ("mc_accuracy", "multiple-choice accuracy (base + LoRA)"),
    ("mc_accuracy_base", "multiple-choice accuracy (base)"),
    ("eval_questions", "questions evaluated"),
    ("squad_f1", "SQuAD F1 (tuned)"), ("squad_em", "SQuAD EM (tuned)"),
    ("squad_f1_base", "SQuAD F1 (base)"), ("squad_em_base", "SQuAD EM (base)"),
    ("squad_retention_f1", "SQuAD F1 retention"), ("squad_retention_em", "SQuAD EM retention"),
    ("retained", "general ability retained"),
    ("contest_score", "contest score"),
    ("trainable_params", "trainable parameters"), ("total_params", "base parameters"),
    ("trainable_ratio_pct", "trainable ratio (%)"),
    ("train_steps", "optimizer steps"), ("train_loss_first", "training loss, first step"),
    ("train_loss_last", "training loss, last step"), ("train_tokens_per_s", "training tokens/s"),
    ("predict_records", "records predicted"), ("predict_examples_per_s", "prediction examples/s"),
]


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def _config_lines(run_dir: Path) -> list[str]:
    path = run_dir / rundir.RESOLVED_CONFIG
    if not path.is_file():
        return ["- (config_resolved.yaml not written: the run stopped before its config was logged)"]
    from omegaconf import OmegaConf

    c = OmegaConf.load(path)
    sel = lambda key: OmegaConf.select(c, key)  # noqa: E731
    return [f"- dataset: {sel('dataset.name')} (path {sel('dataset.path')}, eval split {sel('dataset.eval_split')}, "
            f"{sel('eval.num_shots')}-shot)",
            f"- model: {sel('model.name')} (hidden {sel('model.hidden_size')}, {sel('model.num_layers')} layers, "
            f"checkpoint {sel('model.checkpoint')})",
            f"- LoRA: rank {sel('lora.rank')}, alpha {sel('lora.alpha')}, dropout {sel('lora.dropout')}, "
            f"targets `{sel('lora.target_modules')}`",
            f"- optimizer: {sel('optimizer.name')}, lr {sel('optimizer.learning_rate')}, "
            f"{sel('train.epochs')} epochs x batch {sel('train.batch_size')} (max_steps {sel('train.max_steps')})",
            f"- hardware: {sel('hardware.device_target')} ({sel('hardware.mode')} mode, "
            f"{sel('hardware.compute_dtype')})"]


def report_markdown(run_dir: Path, summary: dict, made: list[str], skipped: list[str]) -> str:
    lines = [f"# Run {run_dir.name}: {summary.get('status', '?')}", ""]
    if summary.get("error"):
        lines += [f"**Error:** {summary['error']}", ""]
    overrides = _overrides(run_dir)
    lines += ["## What ran", "",
              f"- command: `finetune {' '.join(overrides)}`".rstrip() if overrides else "- command: `finetune`",
              f"- stages: {', '.join(summary.get('stages', []))}",
              f"- run dir: `{run_dir}`",
              f"- MLflow run: `{summary.get('mlflow_run_id')}` in `{summary.get('mlflow_uri')}`",
              *_config_lines(run_dir), ""]
    figures = [(label, summary[key]) for key, label in FIGURES if key in summary]
    lines += ["## Figures", ""]
    if figures:
        lines += ["| figure | value |", "| --- | --- |", *[f"| {label} | {_fmt(v)} |" for label, v in figures], ""]
    else:
        lines += ["(no figures: no stage finished)", ""]
    timings = [(k, v) for k, v in summary.items() if (k == "seconds" or k.endswith("_seconds"))
               and isinstance(v, (int, float))]
    lines += ["## Timings", ""]
    lines += [f"- {k}: {_fmt(float(v), 1)} s" for k, v in timings] or ["- (not recorded)"]
    lines += ["", "## Charts and tables", ""]
    for name in made:
        lines.append(f"![{name}]({name})" if name.endswith(".png") else f"- [{name}]({name})")
    lines += [f"- skipped: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, summary: dict, tracker) -> list[Path]:
    """Write per_subject_accuracy.csv, accuracy.png, curves.png and report.md into run_dir (each only
    when its inputs exist), log them under the MLflow run's report/ folder together with the adapter
    and the predictions files; returns the report files written. Never raises."""
    run_dir = Path(run_dir)
    made: list[Path] = []
    skipped: list[str] = []

    def attempt(what: str, fn):
        try:
            made.append(fn())
        except Exception as e:     # a chart must never fail the run
            log.warning("report: %s not written: %s", what, e)
            skipped.append(f"{what} ({type(e).__name__}: {e})")

    try:
        counts = subject_counts(run_dir / rundir.EVAL_PREDICTIONS)
    except Exception as e:       # the n column is optional
        log.warning("report: eval_predictions.jsonl unreadable: %s", e)
        counts = {}
    rows = accuracy_rows(summary, counts)
    if rows:
        attempt(rundir.PER_SUBJECT, lambda: write_accuracy_csv(rows, run_dir / rundir.PER_SUBJECT))
        attempt(rundir.ACCURACY_PLOT, lambda: plot_accuracy(rows, run_dir / rundir.ACCURACY_PLOT))
    else:
        skipped.append("per_subject_accuracy.csv, accuracy.png (no evaluation in this run)")
    trained = "train" in summary.get("stages", ["train"])   # an earlier run's train_log.csv is not this run's
    try:
        curves = read_train_log(run_dir / rundir.TRAIN_LOG) if trained else {}
    except Exception as e:
        curves = None
        skipped.append(f"curves.png (train_log.csv unreadable: {type(e).__name__}: {e})")
    if curves is None:
        pass
    elif curves.get("step") and "loss" in curves:
        attempt(rundir.CURVES_PLOT, lambda: plot_curves(curves, run_dir / rundir.CURVES_PLOT))
    else:
        skipped.append("curves.png (no train_log.csv: no training in this run)")

    def markdown() -> Path:
        path = run_dir / rundir.REPORT
        path.write_text(report_markdown(run_dir, summary, [p.name for p in made], skipped), encoding="utf-8")
        return path

    attempt(rundir.REPORT, markdown)
    try:
        for path in made:
            tracker.log_artifact(path, ARTIFACT_DIR)
        if summary.get("adapter"):   # written by this run's train stage
            tracker.log_artifact(Path(summary["adapter"]), "adapter")
            tracker.log_artifact(run_dir / "mindformers" / "adapter_config.json", "adapter")
        for key in ("predict_output", "predict_results_npy"):
            if summary.get(key):
                tracker.log_artifact(Path(summary[key]), "predictions")
    except Exception as e:
        log.warning("report: logging artifacts failed: %s", e)
    return made


# ---------------------------------------------------------------- a sweep's parent run







