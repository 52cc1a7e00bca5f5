"""Evenly spaced checkpoints, SIGKILL mid-training, resume: same adapter as an uninterrupted run."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from finetune.checkpoints import add_to_index, newest_valid, read_index, save_steps

FINETUNE = [str(Path(sys.executable).with_name("finetune"))]
# 96 training questions / batch 16 = 6 steps per epoch; 5 epochs = 30 steps, checkpoints at 6..30.
QUICK = ["model.pretrain.epochs=1", "dataset.demo.num_words=40", "train.epochs=5", "lora.dropout=0",
         "stages=[prepare,train]", "train.save.num_checkpoints=5", "dataset.demo.num_reading=0",
         "dataset.demo.general_reading=0"]


def test_save_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert save_steps(120, 5) == [24, 48, 72, 96, 120]   # epochs 2, 4, 6, 8, 10 of 10 x 12 steps
    assert save_steps(7, 3) == [2, 5, 7]
    assert save_steps(2, 5) == [1, 2]
    assert save_steps(10, 0) == []


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    for step in (1, 2):
        files = {"adapter": tmp_path / f"a{step}.ckpt", "state": tmp_path / f"s{step}.ckpt"}
        for f in files.values():
            f.write_bytes(bytes(range(256)) * step)
        add_to_index(tmp_path, step, files)
    assert newest_valid(tmp_path)["step"] == 2
    (tmp_path / "s2.ckpt").write_bytes(bytes(range(256)))   # truncated
    assert newest_valid(tmp_path)["step"] == 1
    assert "s2.ckpt is corrupt or truncated" in caplog.text
    (tmp_path / "a1.ckpt").unlink()
    assert newest_valid(tmp_path) is None


def _adapter(path: Path) -> dict:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if "mindpet_delta" in k}


def _run(root, run, extra=()):
    return subprocess.run(FINETUNE + [f"output_root={root}", f"hydra.run.dir={root / run}", *QUICK, *extra],
                          cwd=root, capture_output=True, text=True, timeout=900)


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    full = _run(tmp_path, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert [e["step"] for e in read_index(tmp_path / "full" / "checkpoints")] == [6, 12, 18, 24, 30]

    run = tmp_path / "killed"
    proc = subprocess.Popen(FINETUNE + [f"output_root={tmp_path}", f"hydra.run.dir={run}", *QUICK], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and max((e["step"] for e in read_index(run / "checkpoints")), default=0) < 18:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [e["step"] for e in read_index(run / "checkpoints")]
    assert 18 in steps and 30 not in steps, steps
    # Damage the newest checkpoint: resume must notice (sha256), say so, and use the one before.
    newest = read_index(run / "checkpoints")[-1]
    state = run / "checkpoints" / newest["state"]
    state.write_bytes(state.read_bytes()[:100])

    resumed = _run(tmp_path, "killed", ["train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint at step {newest['step']} unusable" in resumed.stdout + resumed.stderr   # logged by Hydra
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_steps"] == 30 and summary["train_steps_this_run"] == 30 - (newest["step"] - 6)
    a, b = _adapter(tmp_path / "full" / "adapter.ckpt"), _adapter(run / "adapter.ckpt")
    assert set(a) == set(b) and a
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-6, rtol=0, err_msg=name)
    # the log has each step exactly once, and its losses equal the uninterrupted run's
    full_log = (tmp_path / "full" / "train_log.csv").read_text().splitlines()
    log = (run / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == [str(i) for i in range(1, 31)]
    np.testing.assert_allclose([float(x.split(",")[1]) for x in log[1:]],
                               [float(x.split(",")[1]) for x in full_log[1:]], atol=1e-6)


def test_resume_without_checkpoints_is_one_line(tmp_path):
    proc = _run(tmp_path, "empty", ["train.resume=true", "model.pretrain.epochs=0"])
    assert proc.returncode == 2
    assert "finetune: error: train.resume: no usable checkpoint in" in proc.stderr


def test_select_best_checkpoint_respects_retention():
    from finetune.checkpoints import select_best

    scores = [{"step": 10, "mc_accuracy": 0.5, "retained": True},
              {"step": 20, "mc_accuracy": 0.9, "retained": False},   # best accuracy, lost SQuAD ability
              {"step": 30, "mc_accuracy": 0.7, "retained": True},
              {"step": 40, "mc_accuracy": 0.7, "retained": True}]
    assert select_best(scores)["step"] == 30          # tie with 40 goes to the earlier step
    assert select_best([dict(s, retained=None) for s in scores])["step"] == 20   # not measured: eligible
    assert select_best([{"step": 1, "mc_accuracy": 1.0, "retained": False}]) is None


def test_sigterm_marks_the_run_killed(tmp_path):
    """A scheduler's SIGTERM: one line, exit 143, status KILLED in summary.json and in MLflow."""
    import mlflow

    run = tmp_path / "term"
    proc = subprocess.Popen(FINETUNE + [f"output_root={tmp_path}", f"hydra.run.dir={run}", *QUICK,
                                        "model.pretrain.epochs=0"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"finetune: interrupted by SIGTERM; run {run} marked KILLED\n" in err, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "KILLED"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "KILLED"
