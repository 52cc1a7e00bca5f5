"""Numerical health: a run whose loss or gradients stop being finite stops as FAILED with one line,
instead of reporting success on NaN weights; non-finite logits are an error, never a prediction;
summary.json stays valid JSON."""
import json
import math

import numpy as np
import pytest

from finetune.training.checkpoints import read_index
from helpers import run_finetune

ARGS = ["optimizer.learning_rate=1e30", "train.max_steps=6", "stages=[prepare,train,evaluate]", "eval.limit=8",
        "train.save.num_checkpoints=6"]


@pytest.mark.parametrize("scale,stop", [("none", 2), ("dynamic", 4)])
def test_diverged_training_fails_with_one_line(quick_root, scale, stop):
    """lr 1e30: step 1's update leaves weights whose loss is NaN at step 2. Without loss scaling that
    step stops the run; under dynamic scaling each is an overflow (skipped, scale halved) until
    train.max_nonfinite_steps=3 in a row: step 4."""
    from mlflow.tracking import MlflowClient

    run = f"diverged-{scale}"
    proc = run_finetune(quick_root, run, ARGS + [f"hardware.loss_scale.kind={scale}", "train.max_nonfinite_steps=3"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"finetune: error: training diverged at step {stop}: loss ")
    assert "Traceback" not in proc.stderr
    summary = json.loads((quick_root / run / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["error"].startswith(f"training diverged at step {stop}")
    assert "mc_accuracy" not in summary and not (quick_root / run / "adapter.ckpt").exists()
    # what finished before the failure stays: the prepare stage's figures, in summary.json and MLflow
    assert summary["train_questions"] == 96 and summary["prepare_seconds"] >= 0
    # the checkpoint of step 1 (finite loss) is kept; nothing from the steps after it
    assert [e["step"] for e in read_index(quick_root / run / "checkpoints")] == list(range(1, stop))
    client = MlflowClient(f"sqlite:///{quick_root / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(summary["mlflow_run_id"]).data.metrics["train_questions"] == 96
    counts = client.get_metric_history(summary["mlflow_run_id"], "train_nonfinite_steps")
    assert [(m.step, m.value) for m in counts][-1] == (stop, stop - 1)


def test_non_finite_letter_logits_are_an_error():
    from finetune.errors import ModelError
    from finetune.evaluation.scoring import choose

    with pytest.raises(ModelError, match="not finite .* for 1 of 2 questions"):
        choose(np.array([[1.0, 2.0, 3.0, 4.0], [np.nan, 0.0, 0.0, 0.0]], np.float32))
    letters, probs = choose(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32))
    assert letters == ["D"] and probs.sum() == pytest.approx(1.0)


def test_summary_json_writes_non_finite_numbers_as_null(tmp_path):
    from finetune.runtime.summary import write_summary

    write_summary(tmp_path / "s.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2.5})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2.5}
