"""`finetune-compare EXPERIMENT` (or `python -m finetune.tracking.compare`): one table of an experiment's runs,
key params and figures, best first by the sweep objective.

    finetune-compare finetune                        # outputs/mlflow.db, sorted by mc_accuracy
    finetune-compare finetune --parent RUN_ID        # only one sweep's children
    finetune-compare finetune --tracking-uri http://127.0.0.1:5000 --sort contest_score

Sweep parent runs (which repeat their best child's figures) are left out unless --parent names one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# (header, DataFrame column, kind) in print order; kind: text | param | metric | pct | int
COLUMNS = [
    ("run", "tags.mlflow.runName", "text"),
    ("status", "status", "text"),
    ("rank", "params.lora.rank", "param"),
    ("alpha", "params.lora.alpha", "param"),
    ("dropout", "params.lora.dropout", "param"),
    ("lr", "params.optimizer.learning_rate", "param"),
    ("steps", "metrics.train_steps", "int"),
    ("mc_acc", "metrics.mc_accuracy", "metric"),
    ("mc_base", "metrics.mc_accuracy_base", "metric"),
    ("squad_f1", "metrics.squad_f1", "metric"),
    ("squad_em", "metrics.squad_em", "metric"),
    ("ret_f1", "metrics.squad_retention_f1", "metric"),
    ("ret_em", "metrics.squad_retention_em", "metric"),
    ("train%", "metrics.trainable_ratio_pct", "pct"),
    ("contest", "metrics.contest_score", "metric"),
    ("seconds", "duration", "int"),
    ("run_id", "run_id", "text"),
]


def _cell(v, kind: str) -> str:
    import pandas as pd

    if pd.isna(v):     # None, NaN, NaT
        return "-"
    if kind == "metric":
        return f"{float(v):.4f}"
    if kind == "pct":
        return f"{float(v):.3f}"
    if kind == "int":
        return str(int(round(float(v))))
    return str(v)


def sort_column(runs, sort: str) -> str:
    """A sort key as the DataFrame column it means: a metric name, `params.X`/a param name, or a column."""
    for col in (f"metrics.{sort}", sort, f"params.{sort}"):
        if col in runs.columns:
            return col
    metrics = sorted(c[len("metrics."):] for c in runs.columns if c.startswith("metrics."))
    raise ValueError(f"--sort {sort}: no such metric or param in these runs (metrics: {', '.join(metrics)})")


def compare_table(runs, sort: str = "mc_accuracy", ascending: bool = False) -> str:
    """runs: mlflow.search_runs(output_format="pandas") -> an aligned text table, one line per run,
    sorted by `sort` (best first: descending unless ascending); runs without the value come last."""
    import pandas as pd

    runs = runs.copy()
    if {"start_time", "end_time"} <= set(runs.columns):
        runs["duration"] = (pd.to_datetime(runs["end_time"]) - pd.to_datetime(runs["start_time"])).dt.total_seconds()
    col = sort_column(runs, sort) if len(runs) else None
    if col is not None:
        key = pd.to_numeric(runs[col], errors="coerce")
        if key.isna().all() and runs[col].notna().any():       # a text param: sort as text
            key = runs[col].astype(str)
        runs = runs.assign(_key=key).sort_values("_key", ascending=ascending, na_position="last", kind="stable")
    header = [h for h, _, _ in COLUMNS]
    rows = [[_cell(r.get(c), kind) if c in runs.columns else "-" for _, c, kind in COLUMNS]
            for r in runs.to_dict("records")]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = {i for i, (_, _, kind) in enumerate(COLUMNS) if kind == "text"}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def load_runs(uri: str, experiment: str, parent: str | None = None):
    """The experiment's runs as mlflow.search_runs' DataFrame (sweep parents left out unless `parent`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"no experiment {experiment!r} in {uri} (experiments: {', '.join(names) or 'none'})")
    flt = f"tags.mlflow.parentRunId = '{parent}'" if parent else ""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)          # mlflow.search_runs (the DataFrame API) reads the global URI
    try:
        runs = mlflow.search_runs([exp.experiment_id], filter_string=flt, output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)
    if not parent and "tags.sweeper" in runs.columns:
        runs = runs[runs["tags.sweeper"].isna()]          # a sweep's parent run
    return runs


def main(argv=None) -> int:
    from finetune.tracking.store import default_uri

    p = argparse.ArgumentParser(prog="finetune-compare", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="MLflow experiment name (tracking.experiment; default config: finetune)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the local store outputs/mlflow.db, as `finetune` uses)")
    p.add_argument("--sort", default="mc_accuracy", help="metric (or param) to sort by; default mc_accuracy")
    p.add_argument("--ascending", action="store_true", help="smallest first (for an objective to minimize)")
    p.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this sweep parent run")
    args = p.parse_args(argv)

    from finetune.runtime.redact import redact, use_credentials

    uri = use_credentials(args.tracking_uri) if args.tracking_uri else default_uri("outputs")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"finetune-compare: error: no MLflow store at {uri} (run a job first, or pass --tracking-uri)",
              file=sys.stderr)
        return 2
    try:
        runs = load_runs(uri, args.experiment, args.parent)
        table = compare_table(runs, args.sort, args.ascending)
    except (LookupError, ValueError) as e:
        print(f"finetune-compare: error: {redact(e)}", file=sys.stderr)
        return 2
    what = f"children of sweep run {args.parent}" if args.parent else "runs"
    print(f"experiment {args.experiment!r} in {uri}: {len(runs)} {what}, sorted by {args.sort} "
          f"({'ascending' if args.ascending else 'best first'})")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
