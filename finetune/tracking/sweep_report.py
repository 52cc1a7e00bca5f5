"""A sweep's report, written by the sweep callback when a multirun ends (finetune/tracking/sweep.py):
children.csv (one row per job: its swept values and figures), objective_vs_<param>.png per swept
parameter, and, asked for, parameter importances (Optuna's fANOVA) as JSON and a chart."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def swept_params(children: list[dict]) -> list[str]:
    """The config keys whose value differs between a sweep's children (what the sweep varied)."""
    keys = sorted({k for c in children for k in c["params"]})
    return [k for k in keys if len({c["params"].get(k) for c in children}) > 1 and not k.startswith("hydra.")]


def _as_number(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def write_sweep_report(children: list[dict], objective: str, folder: Path, importances: bool = False) -> list[Path]:
    """For a sweep's parent run: children.csv (each child's swept values and objective), one
    objective_vs_<param>.png per swept parameter, and (importances=True, the Optuna sweeper)
    param_importances.json/.png from Optuna's importance evaluator over the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = swept_params(children)
    scored = [c for c in children if objective in c["metrics"]]
    written = []
    with open(folder / "children.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["job", "run_name", "status", *params, objective])
        for c in sorted(children, key=lambda c: int(c["job"]) if str(c["job"]).isdigit() else 0):
            w.writerow([c["job"], c["run_name"], c["status"], *[c["params"].get(p) for p in params],
                        c["metrics"].get(objective)])
    written.append(folder / "children.csv")
    for p in params:
        values = [c["params"].get(p) for c in scored]
        numbers = [_as_number(v) for v in values]
        y = [c["metrics"][objective] for c in scored]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        if values and all(n is not None for n in numbers):
            ax.scatter(numbers, y, color="#1f77b4")
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                ax.set_xscale("log")
        else:
            labels = sorted(set(map(str, values)))
            ax.scatter([labels.index(str(v)) for v in values], y, color="#1f77b4")
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(p)
        ax.set_ylabel(objective)
        ax.set_title(f"{objective} of each finished job vs {p}", fontsize=9)
        fig.tight_layout()
        path = folder / f"objective_vs_{p}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if importances and len(scored) >= 2 and params:
        try:
            written += _importances(scored, params, objective, folder)
        except Exception as e:   # a plot is not worth failing a sweep for
            log.warning("sweep: parameter importances not computed (%s)", e)
    return written


def _importances(scored: list[dict], params: list[str], objective: str, folder: Path) -> list[Path]:
    """Optuna's parameter importances over the finished trials, rebuilt as an in-memory study
    (numbers as uniform ranges, anything else as categories)."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    distributions = {}
    for p in params:
        values = [c["params"].get(p) for c in scored]
        numbers = [_as_number(v) for v in values]
        if all(n is not None for n in numbers) and min(numbers) < max(numbers):
            distributions[p] = optuna.distributions.UniformDistribution(min(numbers), max(numbers))
        else:
            distributions[p] = optuna.distributions.CategoricalDistribution(sorted(set(map(str, values))))
    study = optuna.create_study(direction="maximize")
    for c in scored:
        values = {p: (_as_number(c["params"].get(p)) if isinstance(d, optuna.distributions.UniformDistribution)
                      else str(c["params"].get(p))) for p, d in distributions.items()}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=distributions,
                                                  value=c["metrics"][objective]))
    # Mean decrease in impurity of a random forest (scikit-learn): Optuna 2.10's default fANOVA
    # fails on scikit-learn 1.9's tree layout
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    (folder / "param_importances.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(5, 0.5 * len(result) + 1.5))
    names = list(result)[::-1]
    ax.barh(names, [result[n] for n in names], color="#1f77b4")
    ax.set_xlabel(f"importance for {objective} (Optuna, mean decrease in impurity)")
    fig.tight_layout()
    fig.savefig(folder / "param_importances.png", dpi=100)
    plt.close(fig)
    return [folder / "param_importances.json", folder / "param_importances.png"]
