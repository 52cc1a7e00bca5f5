"""Multirun sweeps (`finetune -m`, subprocess) as one MLflow parent run with nested child runs: a 2x2 grid
with one failing combination, and a 3-trial Optuna sweep through the conf/hydra/sweeper preset."""
import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from finetune.config.schema import SweepConfig
from finetune.tracking.sweep import objective_value, pick_best, retained
from helpers import FINETUNE, QUICK, run_process

# Tiny jobs: the QUICK demo (its base comes from quick_root's cache), 2 optimizer steps, 8 questions.
TINY = [*QUICK, "train.max_steps=2", "eval.limit=8"]


def _multirun(tmp: Path, name: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [FINETUNE, "-m", f"output_root={tmp}", f"hydra.sweep.dir={tmp / name}", f"tracking.experiment={name}",
                      *TINY, *args]
    return run_process(cmd, cwd=tmp, capture_output=True, text=True, timeout=1200)


def _runs(tmp: Path, experiment: str):
    """(client, parent run, children by job number) of the experiment's only sweep."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = {int(r.data.tags["sweep_job"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children.values())
    return client, parents[0], children


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def root(quick_root):
    """The session's output_root: the prepared demo data and the base are built once."""
    return quick_root


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def grid(root):
    # 2x2: jobs 0..3 = (train, base) (train, no base) (no train, base) (no train, no base); the last has
    # nothing to evaluate (no adapter, eval.base=false): a ModelError inside its tracked run.
    proc = _multirun(root, "grid", ["tracking.run_name=grid", "sweep.register_best=grid-best",
                                    "stages=[prepare,train,evaluate,merge],[prepare,evaluate]", "eval.base=true,false"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_grid_parent_and_children(grid):
    root, proc = grid
    _, parent, children = _runs(root, "grid")
    assert sorted(children) == [0, 1, 2, 3]
    assert parent.info.run_name == "grid"
    assert [children[j].info.run_name for j in range(4)] == ["grid-0", "grid-1", "grid-2", "grid-3"]
    assert parent.data.params["stages"] == "[prepare,train,evaluate,merge],[prepare,evaluate]"
    assert parent.data.params["eval.base"] == "true,false"
    assert parent.data.params["train.max_steps"] == "2"
    assert parent.data.tags["sweeper"] == "BasicSweeper"
    overrides = children[3].data.tags["sweep_overrides"]
    assert "stages=[prepare,evaluate]" in overrides and "eval.base=False" in overrides
    assert "stages=[prepare,train,evaluate,merge]" in children[0].data.tags["sweep_overrides"]
    assert children[0].data.params["eval.base"] == "True" and children[3].data.params["eval.base"] == "False"
    # the parent's plots: the objective against each swept key, and the children's table
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert arts == {"sweep/children.csv", "sweep/objective_vs_eval.base.png", "sweep/objective_vs_stages.png"}
    table = (root / "grid" / "sweep_report" / "children.csv").read_text().splitlines()
    assert table[0] == "job,run_name,status,eval.base,stages,mc_accuracy" and len(table) == 5


def test_failing_job_is_failed_and_the_sweep_goes_on(grid):
    root, proc = grid
    _, parent, children = _runs(root, "grid")
    assert [children[j].info.status for j in range(4)] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert "nothing to evaluate" in children[3].data.tags["error"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and "nothing to evaluate" in errors[0]
    assert json.loads((root / "grid" / "3" / "summary.json").read_text())["status"] == "FAILED"
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["sweep_children"], parent.data.tags["sweep_finished"],
            parent.data.tags["sweep_failed"]) == ("4", "3", "1")


def test_best_run_is_the_child_with_the_highest_mc_accuracy(grid):
    root, _ = grid
    _, parent, children = _runs(root, "grid")
    for j in (0, 1, 2):      # each child's metric is its summary.json's
        s = json.loads((root / "grid" / str(j) / "summary.json").read_text())
        assert children[j].data.metrics["mc_accuracy"] == pytest.approx(s["mc_accuracy"])
        assert s["mlflow_run_id"] == children[j].info.run_id
    finished = {j: children[j].data.metrics["mc_accuracy"] for j in (0, 1, 2)}
    best_job = min(j for j, v in finished.items() if v == max(finished.values()))   # ties: lowest job
    assert parent.data.tags["best_run"] == children[best_job].info.run_id
    assert parent.data.tags["best_job"] == str(best_job)
    assert parent.data.metrics["mc_accuracy"] == pytest.approx(max(finished.values()))
    assert parent.data.metrics["trainable_ratio_pct"] == pytest.approx(
        children[best_job].data.metrics["trainable_ratio_pct"])
    assert "mc_accuracy_base" in children[0].data.metrics and "mc_accuracy_base" not in children[1].data.metrics
    # sweep.register_best: the best child's model only (jobs 0 and 1 merged and logged one; 2 did not train)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'grid-best'")
    if best_job in (0, 1):
        assert [v.run_id for v in versions] == [children[best_job].info.run_id]
        assert parent.data.tags["registered_model"] == "grid-best/1"
        assert versions[0].tags["mc_accuracy"] == str(children[best_job].data.metrics["mc_accuracy"])
    else:
        assert versions == [] and "registered_model" not in parent.data.tags


def test_report_on_a_real_run_dir(grid):
    """write_report on a sweep job's own files: the CSV's numbers are summary.json's."""
    from finetune.tracking.run_report import write_report
    from finetune.tracking.tracker import Tracker

    run_dir = grid[0] / "grid" / "0"
    s = json.loads((run_dir / "summary.json").read_text())
    made = {p.name for p in write_report(run_dir, s, Tracker())}
    assert made == {"per_subject_accuracy.csv", "accuracy.png", "curves.png", "report.md"}
    rows = {r["subject"]: r for r in csv.DictReader(open(run_dir / "per_subject_accuracy.csv"))}
    assert set(rows) == set(s["per_subject_accuracy"]) | {"ALL"}
    for subject, acc in s["per_subject_accuracy"].items():
        assert float(rows[subject]["accuracy"]) == acc
        assert float(rows[subject]["accuracy_base"]) == s["per_subject_accuracy_base"][subject]
    assert float(rows["ALL"]["accuracy"]) == s["mc_accuracy"] and int(rows["ALL"]["n"]) == 8


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def optuna(root):
    # Trials evaluate without training (the grid above trains): the objective is contest_score, which the
    # sampled lora.rank moves (trainable ratio) while the accuracy stays the base model's.
    proc = _multirun(root, "optuna", ["hydra/sweeper=finetune_optuna", "hydra.sweeper.n_trials=3",
                                      "stages=[prepare,evaluate]", "sweep.objective=contest_score"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_optuna_preset_three_trials(optuna):
    root, proc = optuna
    _, parent, children = _runs(root, "optuna")
    assert sorted(children) == [0, 1, 2]
    assert parent.data.tags["sweeper"] == "OptunaSweeper"
    assert parent.data.params["lora.rank"] == "choice(4, 8, 16)"     # the preset's search space
    for child in children.values():
        p = child.data.params
        assert child.info.status == "FINISHED"
        assert p["lora.rank"] in ("4", "8", "16") and p["lora.alpha"] in ("8.0", "16.0", "32.0")
        assert 1e-5 <= float(p["optimizer.learning_rate"]) <= 1e-2
        assert 0.0 <= float(p["lora.dropout"]) <= 0.1
        assert f"lora.rank={p['lora.rank']}" in child.data.tags["sweep_overrides"]
        # the sampled rank is what was built: 4 layers x 4 attention projections x rank x (128 + 128 or 64)
        assert child.data.metrics["trainable_params"] == 4 * int(p["lora.rank"]) * (2 * 256 + 2 * (128 + 64))
    # Optuna maximized what the jobs returned (contest_score), and the parent agrees.
    result = OmegaConf.load(root / "optuna" / "optimization_results.yaml")
    scores = [children[j].data.metrics["contest_score"] for j in range(3)]
    assert result.best_value == pytest.approx(max(scores))
    assert parent.data.tags["objective"] == "contest_score"
    assert parent.data.metrics["contest_score"] == pytest.approx(max(scores))
    best = children[int(parent.data.tags["best_job"])]
    assert best.info.run_id == parent.data.tags["best_run"]
    assert best.data.params["lora.rank"] == str(result.best_params["lora.rank"])



def test_optuna_sweep_plots_and_importances(optuna):
    root, _ = optuna
    _, parent, _ = _runs(root, "optuna")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/children.csv", "sweep/param_importances.json", "sweep/param_importances.png",
            "sweep/objective_vs_lora.rank.png"} <= arts, arts
    importances = json.loads((root / "optuna" / "sweep_report" / "param_importances.json").read_text())
    assert set(importances) <= {"lora.rank", "lora.alpha", "lora.dropout", "optimizer.learning_rate"}
    assert sum(importances.values()) == pytest.approx(1.0, abs=1e-6)

def test_optuna_preset_direction_follows_sweep_direction():
    from hydra import compose, initialize_config_dir

    from finetune.config.schema import register
    from helpers import CONF

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for direction in ("maximize", "minimize"):
            cfg = compose("config", overrides=["hydra/sweeper=finetune_optuna", f"sweep.direction={direction}"],
                          return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == direction
            assert cfg.hydra.sweeper.n_jobs == 1 and cfg.hydra.sweeper.sampler.seed == cfg.seed
        plain = compose("config", overrides=["hydra/sweeper=optuna"], return_hydra_config=True)
        assert plain.hydra.sweeper.params is None       # the plugin's own preset still works


@pytest.mark.process
def test_optuna_sweeper_records_a_none_return_as_a_failed_trial(tmp_path):
    """Why a failed job returns None, not nan: hydra-optuna-sweeper 1.3 marks the trial FAIL and goes on
    (a nan makes its study.tell raise and ends the sweep). Checked on a plain Hydra app in this venv."""
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra

        @hydra.main(version_base=None, config_path=None, config_name=None)
        def main(cfg):
            return None if cfg.x == 2 else float(cfg.x)

        main()
    """))
    proc = run_process([sys.executable, "app.py", "-m", "hydra/sweeper=optuna", "+x=choice(1,2,3)",
                        "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=1", "hydra.sweeper.direction=maximize",
                        "hydra.sweeper.sampler.seed=0", f"hydra.sweep.dir={tmp_path / 'out'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = OmegaConf.load(tmp_path / "out" / "optimization_results.yaml")
    assert result.best_value == 3.0
    out = proc.stdout + proc.stderr
    assert "Return value must be float-castable. Got 'None'" in out
    # A nan return is refused by Optuna's tell: this is what None avoids.
    import optuna
    study = optuna.create_study()
    with pytest.raises(ValueError):
        study.tell(study.ask(), values=[math.nan])


# ------------------------------------------------------------------------------- pure functions

def _child(run_id, status="FINISHED", **metrics):
    return {"run_id": run_id, "status": status, "metrics": metrics, "params": {"eval.retention_threshold": "0.9"}}


def test_pick_best_maximize_minimize_and_ties():
    kids = [_child("a", mc_accuracy=0.5), _child("b", mc_accuracy=0.75), _child("c", mc_accuracy=0.75),
            _child("d", "FAILED"), _child("e", mc_accuracy=0.25)]
    best, counts = pick_best(kids, "mc_accuracy")
    assert best["run_id"] == "b"                               # tie with c: the earlier job
    assert counts == {"children": 5, "finished": 4, "failed": 1, "not_retained": 0, "no_objective": 0}
    assert pick_best(kids, "mc_accuracy", "minimize")[0]["run_id"] == "e"
    assert pick_best([_child("x", loss=1.0)], "mc_accuracy") == (None, {
        "children": 1, "finished": 1, "failed": 0, "not_retained": 0, "no_objective": 1})
    with pytest.raises(ValueError, match="sweep.direction"):
        pick_best(kids, "mc_accuracy", "up")


def test_pick_best_excludes_children_that_lost_squad_ability():
    squad_ok = dict(squad_f1=50.0, squad_em=40.0, squad_f1_base=50.0, squad_em_base=40.0)
    squad_lost = dict(squad_f1=20.0, squad_em=40.0, squad_f1_base=50.0, squad_em_base=40.0)   # F1 kept 40%
    kids = [_child("lost", mc_accuracy=0.9, **squad_lost), _child("kept", mc_accuracy=0.6, **squad_ok),
            _child("unmeasured", mc_accuracy=0.5)]
    assert retained(kids[0]["metrics"], kids[0]["params"]) is False
    assert retained(kids[1]["metrics"], kids[1]["params"]) is True
    assert retained(kids[2]["metrics"], kids[2]["params"]) is None
    best, counts = pick_best(kids, "mc_accuracy", require_retained=True)
    assert best["run_id"] == "kept" and counts["not_retained"] == 1
    assert pick_best(kids, "mc_accuracy", require_retained=False)[0]["run_id"] == "lost"
    # The run's own threshold counts: 40% retention passes a 0.3 threshold.
    kids[0]["params"]["eval.retention_threshold"] = "0.3"
    assert pick_best(kids, "mc_accuracy", require_retained=True)[0]["run_id"] == "lost"


def test_objective_value():
    sweep = OmegaConf.structured(SweepConfig)
    assert objective_value({"mc_accuracy": 0.5}, sweep) == 0.5
    assert objective_value({}, sweep) is None
    assert objective_value({"mc_accuracy": math.nan}, sweep) is None
    assert objective_value({"mc_accuracy": 0.5, "retained": False}, sweep) is None
    assert objective_value({"mc_accuracy": 0.5, "retained": True}, sweep) == 0.5
    sweep.require_retained = False
    assert objective_value({"mc_accuracy": 0.5, "retained": False}, sweep) == 0.5
    sweep.objective = "contest_score"
    assert objective_value({"mc_accuracy": 0.5, "contest_score": 0.61}, sweep) == 0.61
