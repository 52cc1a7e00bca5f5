"""Run options the README promises, each on a real `finetune` job of the QUICK demo (conftest's
quick_root: the base is pretrained once per session) or on conftest's reference run: early
stopping that stops and keeps the best adapter, tracking.log_model=false,
tracking.system_metrics=false, and the training pad fraction in summary.json."""
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import run_finetune

ASKED = 30          # 5 epochs x 6 steps of the QUICK demo's 96 training questions
PATIENCE = 3
# One job for three options: early stopping on the general-text loss (lower is better; the demo's
# 10 reading questions are its held-out passages), measured every step, an adapter saved at every
# step (the kept one is compared with them); no MLflow model, no system metrics (sampled every
# second if they were on).
LEAN = ["stages=[prepare,train,merge]", "dataset.demo.squad_questions=10", "train.epochs=5", "lora.dropout=0",
        "eval.every_n_steps=1", "train.early_stopping.metric=during_general_loss_delta",
        f"train.early_stopping.patience={PATIENCE}", f"train.save.num_checkpoints={ASKED}",
        "tracking.log_model=false", "tracking.system_metrics=false", "tracking.system_metrics_interval=1"]


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def lean(quick_root):
    """(output_root, run dir, summary) of the LEAN job."""
    proc = run_finetune(quick_root, "lean", LEAN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = quick_root / "lean"
    return quick_root, run, json.loads((run / "summary.json").read_text())


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _adapter(path: Path) -> dict:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if "mindpet_delta" in k}


def test_early_stopping_stops_and_keeps_the_best_adapter(lean):
    """train.early_stopping.metric=during_general_loss_delta, patience 3: training stops 3 evaluations
    after the best one (the lowest delta), well before the 30 steps asked, and adapter.ckpt holds the
    weights of that best step, not of the last one."""
    root, run, s = lean
    steps = s["train_steps"]
    assert s["status"] == "FINISHED" and s["early_stopped"] is True
    assert steps < ASKED
    history = sorted((m.step, m.value) for m in _client(root).get_metric_history(s["mlflow_run_id"],
                                                                                 "during_general_loss_delta"))
    assert [step for step, _ in history] == list(range(1, steps + 1)) and s["during_evaluations"] == steps
    best_step, best = min(history, key=lambda h: (h[1], h[0]))          # lowest; the earlier of equals
    assert s["early_stopping_best_step"] == best_step and s["early_stopping_best"] == pytest.approx(best)
    assert steps == best_step + PATIENCE and best_step > 1              # it improved, then stopped improving
    log = (run / "train_log.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in log] == list(range(1, steps + 1))
    kept = _adapter(run / "adapter.ckpt")
    at = {step: _adapter(run / "checkpoints" / f"adapter-step{step:06d}.ckpt") for step in (best_step, steps)}
    assert set(kept) == set(at[best_step]) and kept
    for name in kept:
        np.testing.assert_array_equal(kept[name], at[best_step][name], err_msg=name)
    assert any(not np.array_equal(kept[n], at[steps][n]) for n in kept)   # not the last step's weights
    assert not (run / "adapter-best.ckpt").exists()
    assert Path(s["merged"]).is_file()                                 # merge ran on the kept adapter


def test_log_model_false_logs_no_mlflow_model(lean):
    """tracking.log_model=false: the merge stage ran (merged.ckpt) but the run has no LoggedModel and
    summary.json no model URI (with the default, test_pipeline's run has both)."""
    root, run, s = lean
    assert (run / "merged.ckpt").is_file()
    assert "mlflow_model_uri" not in s and "mlflow_model_id" not in s
    client = _client(root)
    experiment = client.get_run(s["mlflow_run_id"]).info.experiment_id
    models, page = [], None
    while True:   # every LoggedModel of the experiment (test_pipeline's run logs one to it)
        got = client.search_logged_models(experiment_ids=[experiment], page_token=page)
        models += got
        page = got.token
        if not page:
            break
    assert [m.model_id for m in models if m.source_run_id == s["mlflow_run_id"]] == []


def test_system_metrics_false_logs_no_system_metrics(lean):
    """tracking.system_metrics=false: no system/* metric in the run, although the job trained for
    longer than the 1 s sampling interval it was given (with the default, test_pipeline's run has them)."""
    root, _, s = lean
    assert s["train_seconds"] > 3
    metrics = _client(root).get_run(s["mlflow_run_id"]).data.metrics
    assert "train_loss_last" in metrics                                # the run's own metrics are there
    assert [k for k in metrics if k.startswith("system/")] == []


def test_train_pad_fraction_is_the_padding_of_the_trained_rows(reference_run):
    """summary.json's train_pad_fraction: the share of the positions the training steps computed that
    held no example. The reference run visits every packed row of 64 positions equally often (whole
    epochs), so it is 1 - (positions its examples take) / (rows x 64), from the prepared examples."""
    from finetune.data.mindrecord import read_shards
    from finetune.data.tokenizer import load_tokenizer

    s = json.loads((reference_run / "summary.json").read_text())
    ids, _ = read_shards(Path(s["prepared_data"]) / "mindrecord" / "train.mindrecord")
    tok = load_tokenizer("tiktoken", None)
    assert tok.pad_id != tok.eos_id
    taken = int(((ids != tok.pad_id).sum(axis=1) - 1).sum())           # an example of n tokens takes n - 1 positions
    rows, per_step = s["train_packed_rows"], s["train_rows_per_step"]
    assert s["train_packing"] is True and s["train_examples"] == len(ids) == 96
    assert s["train_micro_steps"] == 1                                  # rows x 64 within hardware.micro_batch_tokens
    assert (s["train_steps"] * per_step) % rows == 0                    # whole epochs: each row equally often
    assert s["train_pad_fraction"] == pytest.approx(1 - taken / (rows * 64), abs=1e-12)
    assert 0.1 < s["train_pad_fraction"] < 0.5                          # ~46 of 64 positions used
