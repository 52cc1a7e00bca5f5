"""Data parallel through msrun (2 CPU workers) against the single-process run; a dying worker."""
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from finetune.data.mindrecord import read_shards, write_shards
from helpers import REFERENCE, kill_group, output, resolved, run_finetune, start_finetune

# conftest's reference run (the QUICK demo: 96 training questions -> 6 global batches of 16 per
# epoch; 30 steps cross four epoch boundaries, a new batch order each epoch; dropout off) on two
# workers with half the batch each. The master port is a free one (the default, parallel.master_port=0).
ARGS = [*REFERENCE, "parallel=dp2", "train.batch_size=8"]


def _losses(run_dir: Path) -> np.ndarray:
    lines = (run_dir / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss")
    return np.array([float(line.split(",")[1]) for line in lines[1:]])


def test_round_robin_shards_give_the_same_global_batches(tmp_path):
    """Global batch k of the one-shard layout == the union of every rank's local batch k."""
    examples = [([i, i + 1], [i, -100]) for i in range(37)]
    one = read_shards(write_shards(examples, tmp_path / "one.mindrecord", 1)[0])[0]
    files = write_shards(examples, tmp_path / "two.mindrecord", 2)
    assert [f.name for f in files] == ["two.mindrecord0", "two.mindrecord1"]
    r0 = read_shards(tmp_path / "two.mindrecord", 2, 0)[0]
    r1 = read_shards(tmp_path / "two.mindrecord", 2, 1)[0]
    assert len(r0) == len(r1) == 18                       # 37 -> 36: equal steps on every rank
    assert sorted(one[:, 0].tolist()) == list(range(37))  # every example once, shuffled
    assert one[:, 0].tolist() != list(range(37))
    b = 4  # per-rank batch; global batch 8
    for k in range(len(r0) // b):
        union = sorted(r0[k * b:(k + 1) * b, 0].tolist() + r1[k * b:(k + 1) * b, 0].tolist())
        assert union == sorted(one[k * 2 * b:(k + 1) * 2 * b, 0].tolist())


@pytest.fixture(scope="session")   # session: xdist may interleave modules of one group
def runs(quick_root, reference_run):
    dp2 = run_finetune(quick_root, "dp2", ARGS)
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    return quick_root, reference_run


def test_dp2_matches_single_process_loss_curve(runs):
    root, reference = runs
    single, dp2 = _losses(reference), _losses(root / "dp2")
    assert len(single) == len(dp2) == 30
    assert np.abs(single - dp2).max() < 1e-3, np.abs(single - dp2)
    assert single[-1] < single[0]   # it trained


def test_dp2_writes_one_logical_run(runs):
    root, _ = runs
    run = root / "dp2"
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["train_global_batch"] == 16 and s["train_steps"] == 30
    assert sorted(p.name for p in (run / "msrun").glob("worker_*.log")) == ["worker_0.log", "worker_1.log"]
    # rank 0 alone saves: one adapter, one checkpoint set
    assert [e["step"] for e in json.loads((run / "checkpoints" / "index.json").read_text())] == [6, 12, 18, 24, 30]
    assert (run / "adapter.ckpt").is_file()
    from mlflow.tracking import MlflowClient

    runs_ = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_experiment_by_name("finetune").experiment_id],
        filter_string=f"tags.run_dir = '{run}'")
    assert len(runs_) == 1 and runs_[0].info.run_id == s["mlflow_run_id"]   # only rank 0 logged


def _worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of this job's msrun workers (from /proc: their RANK_ID and run dir)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if any(b"worker.py" in c for c in cmd) and f"hydra.run.dir={run_dir}".encode() in cmd and b"RANK_ID" in env:
            found[int(env[b"RANK_ID"])] = int(proc.name)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_dying_worker_fails_the_job_without_hanging(runs):
    """README: if a worker dies, msrun stops the others and `finetune` exits 1 naming the worker that
    failed first and the end of its log; the run is FAILED in summary.json and MLflow."""
    from mlflow.tracking import MlflowClient

    root, _ = runs
    run = root / "dp2-killed"
    proc = start_finetune(root, "dp2-killed", ARGS + ["train.epochs=400"])
    try:
        deadline = time.time() + 300
        # rank 0 has joined the communication group and opened its MLflow run (summary.json RUNNING)
        while time.time() < deadline and not ((run / "summary.json").is_file() and len(_worker_pids(run)) == 2):
            assert proc.poll() is None, output(proc)[1][-2000:]
            time.sleep(0.5)
        pids = _worker_pids(run)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=240)   # must end, not hang in the AllReduce
    finally:
        kill_group(proc)
    _, err = output(proc)
    assert proc.returncode == 1, err[-2000:]
    assert not _alive(pids[0]), "rank 0 still runs after its peer died"
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("finetune: error: msrun exited"))
    assert "worker_1.log failed first (killed by signal 9)" in lines[first], lines[first]
    log_tail = (run / "msrun" / "worker_1.log").read_text().splitlines()[-3:]
    assert all(line in lines[first + 1:] for line in log_tail if line.strip()), "the log tail is not shown"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "FAILED" and "worker_1.log failed first" in summary["error"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FAILED"


def test_world_size_must_split_over_nodes():
    from finetune.errors import ConfigError
    from finetune.runtime.launch import local_workers

    with pytest.raises(ConfigError, match="parallel.nodes=3"):
        resolved(["parallel=dp4", "parallel.nodes=3", "parallel.master_port=8118"])
    assert local_workers(resolved(["parallel=dp8", "parallel.nodes=2", "parallel.master_port=8118"]).parallel) == 4
