"""Evenly spaced checkpoints, SIGKILL mid-training, resume: same adapter as an uninterrupted run."""
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from finetune.errors import ModelError
from finetune.training.checkpoints import add_to_index, newest_valid, read_index, save_steps
from helpers import QUICK, kill_group, output, resolved, run_finetune, start_finetune
from helpers import REFERENCE as ARGS


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
    return run_finetune(root, run, ARGS + list(extra))


def _wait_for(predicate, proc, seconds=300, poll=0.2):
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        assert proc.poll() is None, "the job ended before the test could interrupt it"
        time.sleep(poll)
    assert predicate(), "timed out"


def test_killed_run_resumes_to_the_same_adapter(quick_root, reference_run):
    tmp_path = quick_root
    assert [e["step"] for e in read_index(reference_run / "checkpoints")] == [6, 12, 18, 24, 30]

    run = tmp_path / "resume-killed"
    proc = start_finetune(tmp_path, "resume-killed", ARGS)
    try:
        _wait_for(lambda: max((e["step"] for e in read_index(run / "checkpoints")), default=0) >= 18, proc)
    finally:
        kill_group(proc)   # SIGKILL: no clean-up of any kind
    steps = [e["step"] for e in read_index(run / "checkpoints")]
    assert 18 in steps and 30 not in steps, steps
    killed_run_id = json.loads((run / "summary.json").read_text())["mlflow_run_id"]
    # Damage the newest checkpoint: resume must notice (sha256), say so, and use the one before.
    newest = read_index(run / "checkpoints")[-1]
    state = run / "checkpoints" / newest["state"]
    state.write_bytes(state.read_bytes()[:100])

    resumed = _run(tmp_path, "resume-killed", ["train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint at step {newest['step']} unusable" in resumed.stdout + resumed.stderr   # logged by Hydra
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_steps"] == 30 and summary["train_steps_this_run"] == 30 - (newest["step"] - 6)
    a, b = _adapter(reference_run / "adapter.ckpt"), _adapter(run / "adapter.ckpt")
    assert set(a) == set(b) and a
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    # bit for bit: the adapter above; the log has each step exactly once, and its loss, learning rate
    # and gradient norm are the uninterrupted run's (as written: 8 significant digits)
    full_log = (reference_run / "train_log.csv").read_text().splitlines()
    log = (run / "train_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == [str(i) for i in range(1, 31)]
    assert [x.split(",")[1:4] for x in log[1:]] == [x.split(",")[1:4] for x in full_log[1:]]
    # ... and so has MLflow: the resumed training continues the killed run's MLflow run (RUNNING
    # again, then FINISHED), each step's loss once, equal to the uninterrupted run's
    from mlflow.tracking import MlflowClient

    assert summary["mlflow_run_id"] == killed_run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    got = client.get_run(killed_run_id)
    assert got.info.status == "FINISHED" and got.data.tags["resumed_from_step"] == str(newest["step"] - 6)
    history = sorted((m.step, m.value) for m in client.get_metric_history(killed_run_id, "train_loss"))
    assert [step for step, _ in history] == list(range(1, 31))
    # (to 1e-6: train_log.csv keeps 8 significant digits, and steps the killed run had not sent come from it)
    np.testing.assert_allclose([v for _, v in history], [float(x.split(",")[1]) for x in full_log[1:]], atol=1e-6)
    assert got.data.params["train.resume"] == "False"   # kept; the change is a tag
    assert got.data.tags["resume_changed_params"] == "train.resume=True"


def test_resume_without_checkpoints_is_one_line(tmp_path):
    with pytest.raises(ModelError, match=f"^train.resume: no usable checkpoint in {tmp_path / 'checkpoints'} "):
        _checks(tmp_path, ["train.resume=true"])


def test_resume_with_other_lora_settings_is_refused(reference_run):
    """Resuming a rank-8 run's checkpoint with lora.alpha=32 would continue a different model:
    refused at start-up, before any data or model is loaded."""
    with pytest.raises(ModelError, match=r"^train.resume: the checkpoint was trained with other LoRA settings: "
                                         r"lora.alpha=32.0 \(checkpoint: 16.0\)$"):
        _checks(reference_run, ["train.resume=true", "lora.alpha=32"])


def _checks(run_dir, extra=()):
    from finetune.app import start_up_checks

    start_up_checks(resolved([*QUICK, *ARGS, *extra]), run_dir, frozenset())


def test_resume_with_other_training_settings_is_refused_naming_them(reference_run):
    """Checked at start-up against checkpoints/run.json (no data or model loaded yet): a changed
    learning rate or number of epochs continues a different run."""
    with pytest.raises(ModelError, match=r"trained with other settings: optimizer.learning_rate=0.001 "
                                         r"\(checkpoint: 0.005\), train.epochs=6 \(checkpoint: 5\); "):
        _checks(reference_run, ["train.resume=true", "optimizer.learning_rate=1e-3", "train.epochs=6"])
    _checks(reference_run, ["train.resume=true", "train.save.num_checkpoints=2"])   # saving less changes nothing
    # ... and by the stage, once the data is prepared: other data is another run
    from finetune.training.checkpoints import resume_point, training_settings

    cfg = resolved([*QUICK, *ARGS, "train.resume=true"])
    recorded = json.loads((reference_run / "checkpoints" / "run.json").read_text())["data"]
    assert resume_point(cfg, reference_run, training_settings(cfg, Path("/x") / recorded))["step"] == 30
    with pytest.raises(ModelError, match=rf"data=demo-other \(checkpoint: {recorded}\)"):
        resume_point(cfg, reference_run, training_settings(cfg, Path("/x/demo-other")))


def test_training_again_in_a_run_dir_with_checkpoints_is_refused(reference_run, tmp_path):
    with pytest.raises(ModelError, match=r"holds checkpoints of an earlier run \(steps 6, 12, 18, 24, 30\); "
                                         r"set train.resume=true to continue it, train.overwrite=true to replace it"):
        _checks(reference_run)
    # train.overwrite=true: accepted at start-up; the stage deletes the earlier run's training files
    import shutil

    from finetune.training.checkpoints import check_fresh_run_dir

    run = shutil.copytree(reference_run, tmp_path / "run", symlinks=True)
    _checks(run, ["train.overwrite=true"])
    assert (run / "checkpoints" / "index.json").is_file()
    check_fresh_run_dir(resolved([*QUICK, *ARGS, "train.overwrite=true"]), run, clear=True)
    assert not (run / "checkpoints").exists() and not (run / "train_log.csv").exists()
    assert not (run / "adapter.ckpt").exists() and (run / "summary.json").is_file()


def test_select_best_checkpoint_respects_retention():
    from finetune.evaluation.metrics import select_best

    scores = [{"step": 10, "mc_accuracy": 0.5, "retained": True},
              {"step": 20, "mc_accuracy": 0.9, "retained": False},   # best accuracy, lost SQuAD ability
              {"step": 30, "mc_accuracy": 0.7, "retained": True},
              {"step": 40, "mc_accuracy": 0.7, "retained": True}]
    assert select_best(scores)["step"] == 30          # tie with 40 goes to the earlier step
    assert select_best([dict(s, retained=None) for s in scores])["step"] == 20   # not measured: eligible
    assert select_best([{"step": 1, "mc_accuracy": 1.0, "retained": False}]) is None


def _running(summary: Path) -> bool:
    try:
        return json.loads(summary.read_text())["status"] == "RUNNING"
    except (OSError, ValueError, KeyError):
        return False


# (signal, when, what `finetune` reports it as). Ctrl-C is SIGINT to the `finetune` process. Once
# MindSpore has run a graph, its runtime turns a SIGINT into a SIGTERM of the process (measured:
# MindSpore 2.9's C++ SignalGuard), so a Ctrl-C during training ends as a SIGTERM: exit 143, not 130.
STOPS = [(signal.SIGTERM, "started", signal.SIGTERM), (signal.SIGINT, "started", signal.SIGINT),
         (signal.SIGINT, "training", signal.SIGTERM)]


@pytest.mark.parametrize(("sig", "when", "seen"), STOPS,
                         ids=["SIGTERM-at-start", "Ctrl-C-at-start-exit-130", "Ctrl-C-in-training-exit-143"])
def test_a_stopped_run_is_marked_killed(quick_root, sig, when, seen):
    """A scheduler's SIGTERM or a user's Ctrl-C, as soon as the run has started (summary.json
    RUNNING, before any graph ran) or during training: one line, exit 128 + the signal seen, status
    KILLED in summary.json and in MLflow."""
    import mlflow

    run = quick_root / f"stopped-{sig.name}-{when}"
    proc = start_finetune(quick_root, run.name, ARGS)
    log = run / "train_log.csv"
    started = (lambda: _running(run / "summary.json")) if when == "started" else \
        (lambda: log.is_file() and len(log.read_text().splitlines()) >= 3)
    try:
        _wait_for(started, proc, poll=0.05)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        kill_group(proc)
    _, err = output(proc)
    assert proc.returncode == 128 + seen, err[-2000:]
    assert f"finetune: interrupted by {seen.name}; run {run} marked KILLED\n" in err, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "KILLED"
    if when == "training":   # stopped where it was: some steps done, not all
        assert 2 <= len(log.read_text().splitlines()) - 1 < 30
    client = mlflow.tracking.MlflowClient(f"sqlite:///{quick_root / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "KILLED"
