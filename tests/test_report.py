"""Run report artifacts (finetune/tracking/report.py): CSV + charts + report.md written with real matplotlib and
logged to a real MLflow SQLite store. The run dir holds files in the formats the stages write (a
real job's run dir is checked in test_sweep.py::test_report_on_a_real_run_dir)."""
import csv
import json

import pytest
from mlflow.tracking import MlflowClient

from finetune.tracking.run_report import accuracy_rows, read_train_log, write_report
from finetune.tracking.tracker import Tracker

PNG = b"\x89PNG\r\n\x1a\n"
SUMMARY = {
    "status": "FINISHED", "stages": ["prepare", "train", "evaluate"], "mlflow_run_id": "x", "mlflow_uri": "y",
    "mc_accuracy": 0.625, "mc_accuracy_base": 0.375,
    "per_subject_accuracy": {"use": 0.5, "kind": 0.75, "place": 2 / 3},
    "per_subject_accuracy_base": {"use": 0.25, "kind": 0.5, "place": 1 / 3},
    "squad_f1": 41.5, "squad_f1_base": 43.0, "retained": True, "contest_score": 0.5123,
    "trainable_ratio_pct": 2.4917, "train_steps": 3, "seconds": 61.25,
}
SUBJECTS = ["kind"] * 4 + ["use"] * 2 + ["place"] * 3


def _run_dir(tmp_path, train_log=True):
    run = tmp_path / "run"
    (run / "mindformers").mkdir(parents=True)
    with open(run / "eval_predictions.jsonl", "w") as f:
        for i, s in enumerate(SUBJECTS):
            f.write(json.dumps({"id": f"q{i}", "subject": s, "answer": "A", "prediction": "A"}) + "\n")
    if train_log:
        (run / "train_log.csv").write_text("step,loss,lr,grad_norm,tokens_per_s,loss_scale\n"
                                           "1,4.5,0.005,0.28,15.6,1\n2,3.25,0.0025,0.35,723.4,1\n"
                                           "3,2.0,0.0,0.30,731.0,1\n")
    (run / "adapter.ckpt").write_bytes(b"\0" * 64)
    (run / "mindformers" / "adapter_config.json").write_text("{}")
    (run / "predictions.jsonl").write_text('{"id": "p1", "prediction": "B"}\n')
    return run


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def store(tmp_path_factory, new_store):
    root = tmp_path_factory.mktemp("mlflow")
    return root, new_store(root)


def test_report_files_and_artifacts(tmp_path, store):
    run = _run_dir(tmp_path)
    tracker = Tracker(store[1], "report", "r")
    summary = {**SUMMARY, "adapter": str(run / "adapter.ckpt"), "predict_output": str(run / "predictions.jsonl")}
    made = write_report(run, summary, tracker)
    tracker.end("FINISHED")
    assert [p.name for p in made] == ["per_subject_accuracy.csv", "accuracy.png", "curves.png", "report.md"]

    rows = list(csv.DictReader(open(run / "per_subject_accuracy.csv")))
    assert [r["subject"] for r in rows] == ["kind", "place", "use", "ALL"]
    by = {r["subject"]: r for r in rows}
    for s in ("kind", "place", "use"):
        assert float(by[s]["accuracy"]) == SUMMARY["per_subject_accuracy"][s]           # exact round trip
        assert float(by[s]["accuracy_base"]) == SUMMARY["per_subject_accuracy_base"][s]
    assert [by[s]["n"] for s in ("kind", "place", "use", "ALL")] == ["4", "3", "2", "9"]
    assert (float(by["ALL"]["accuracy"]), float(by["ALL"]["accuracy_base"])) == (0.625, 0.375)

    import matplotlib.image

    for name, min_width in (("accuracy.png", 500), ("curves.png", 900)):
        data = (run / name).read_bytes()
        assert data[:8] == PNG
        height, width = matplotlib.image.imread(run / name).shape[:2]
        assert width >= min_width and height >= 300

    md = (run / "report.md").read_text()
    assert md.startswith("# Run run: FINISHED")
    assert "| multiple-choice accuracy (base + LoRA) | 0.6250 |" in md
    assert "| general ability retained | yes |" in md
    assert "- seconds: 61.2 s" in md or "- seconds: 61.3 s" in md
    assert "![accuracy.png](accuracy.png)" in md and "![curves.png](curves.png)" in md
    assert "skipped" not in md

    client = MlflowClient(store[1])
    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"report", "adapter", "predictions"} <= top
    assert {a.path for a in client.list_artifacts(tracker.run_id, "report")} == {
        "report/per_subject_accuracy.csv", "report/accuracy.png", "report/curves.png", "report/report.md"}
    assert {a.path for a in client.list_artifacts(tracker.run_id, "adapter")} == {
        "adapter/adapter.ckpt", "adapter/adapter_config.json"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "predictions")] == ["predictions/predictions.jsonl"]


def test_missing_inputs_are_skipped_and_said(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    made = write_report(run, {"status": "FAILED", "stages": ["prepare", "evaluate"]}, Tracker())
    assert [p.name for p in made] == ["report.md"]
    md = (run / "report.md").read_text()
    assert md.startswith("# Run run: FAILED")
    assert "- skipped: per_subject_accuracy.csv, accuracy.png (no evaluation in this run)" in md
    assert "- skipped: curves.png (no train_log.csv: no training in this run)" in md
    assert "config_resolved.yaml not written" in md and "(no figures: no stage finished)" in md


def test_a_broken_input_never_fails_the_run(tmp_path):
    run = _run_dir(tmp_path, train_log=False)
    (run / "train_log.csv").write_text("step,loss,lr\n1,4.5,0.005\n2,oops,0.004\n")   # unreadable value
    made = write_report(run, SUMMARY, Tracker())
    assert [p.name for p in made] == ["per_subject_accuracy.csv", "accuracy.png", "report.md"]
    md = (run / "report.md").read_text()
    assert "- skipped: curves.png (no train_log.csv" not in md
    assert "curves.png" in md and "ValueError" in md


def test_accuracy_rows_without_base_or_counts():
    rows = accuracy_rows({"mc_accuracy": 0.5, "per_subject_accuracy": {"b": 0.25, "a": 0.75}}, {})
    assert rows == [{"subject": "a", "n": None, "accuracy_base": None, "accuracy": 0.75},
                    {"subject": "b", "n": None, "accuracy_base": None, "accuracy": 0.25},
                    {"subject": "ALL", "n": None, "accuracy_base": None, "accuracy": 0.5}]
    assert accuracy_rows({}, {}) == []


def test_read_train_log(tmp_path):
    assert read_train_log(tmp_path / "absent.csv") == {}
    (tmp_path / "t.csv").write_text("step,loss,lr,grad_norm\n1,2.5,0.001,0.1\n2,1.5,0.0005,0.2\n")
    assert read_train_log(tmp_path / "t.csv") == {"step": [1.0, 2.0], "loss": [2.5, 1.5], "lr": [0.001, 0.0005]}
    (tmp_path / "e.csv").write_text("step,loss,lr\n")
    assert read_train_log(tmp_path / "e.csv") == {}


def test_sweep_report_from_children(tmp_path):
    """The sweep parent's plots from its children: swept keys found by comparing params, one plot
    each (numbers on a log axis when they span decades), the failed child in the table only."""
    from finetune.tracking.sweep_report import swept_params, write_sweep_report

    children = [{"job": str(i), "run_name": f"s-{i}", "status": "FINISHED" if i < 3 else "FAILED",
                 "params": {"lora.rank": str(r), "optimizer.learning_rate": str(lr), "seed": "0"},
                 "metrics": {"mc_accuracy": acc} if i < 3 else {}}
                for i, (r, lr, acc) in enumerate([(4, 1e-4, 0.5), (8, 1e-2, 0.7), (16, 1e-3, 0.6), (8, 1e-5, 0)])]
    assert swept_params(children) == ["lora.rank", "optimizer.learning_rate"]
    files = write_sweep_report(children, "mc_accuracy", tmp_path, importances=True)
    names = sorted(p.name for p in files)
    assert names == ["children.csv", "objective_vs_lora.rank.png", "objective_vs_optimizer.learning_rate.png",
                     "param_importances.json", "param_importances.png"]
    rows = (tmp_path / "children.csv").read_text().splitlines()
    assert rows[0] == "job,run_name,status,lora.rank,optimizer.learning_rate,mc_accuracy"
    assert rows[4] == "3,s-3,FAILED,8,1e-05,"
