"""Data parallel through msrun (2 CPU workers) against the single-process run; a dying worker."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import compose
from finetune.data.mindrecord import read_shards, write_shards

FINETUNE = [str(Path(sys.executable).with_name("finetune"))]
# A small demo (96 training questions -> 6 global batches of 16 per epoch), a quickly pretrained
# base, dropout off; 20 optimizer steps cross three epoch boundaries (new batch order each epoch).
QUICK = ["model.pretrain.epochs=1", "dataset.demo.num_words=40", "train.epochs=4", "train.max_steps=20",
         "lora.dropout=0", "stages=[prepare,train]", "train.save.num_checkpoints=2",
         "dataset.demo.num_reading=0", "dataset.demo.general_reading=0"]


def _cmd(root: Path, run: str, args) -> list[str]:
    return FINETUNE + [f"output_root={root}", f"hydra.run.dir={root / run}", *QUICK, *args]


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    single = subprocess.run(_cmd(root, "single", ["train.batch_size=16"]), cwd=root, capture_output=True,
                            text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    dp2 = subprocess.run(_cmd(root, "dp2", ["parallel=dp2", "train.batch_size=8", "parallel.master_port=8357"]),
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert dp2.returncode == 0, dp2.stderr[-3000:]
    return root, dp2


def test_dp2_matches_single_process_loss_curve(runs):
    root, _ = runs
    single, dp2 = _losses(root / "single"), _losses(root / "dp2")
    assert len(single) == len(dp2) == 20
    assert np.abs(single - dp2).max() < 1e-3, np.abs(single - dp2)
    assert single[-1] < single[0]   # it trained


def test_dp2_writes_one_logical_run(runs):
    root, _ = runs
    run = root / "dp2"
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["train_global_batch"] == 16 and s["train_steps"] == 20
    assert sorted(p.name for p in (run / "msrun").glob("worker_*.log")) == ["worker_0.log", "worker_1.log"]
    # rank 0 alone saves: one adapter, one checkpoint set (steps 10 and 20)
    assert [e["step"] for e in json.loads((run / "checkpoints" / "index.json").read_text())] == [10, 20]
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


def test_a_dying_worker_fails_the_job_without_hanging(runs):
    root, _ = runs
    run = root / "dp2-killed"
    cmd = _cmd(root, "dp2-killed", ["parallel=dp2", "train.batch_size=8", "parallel.master_port=8359",
                                    "train.epochs=400", "train.max_steps=null"])
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "train_log.csv").is_file():   # rank 0 is training
        time.sleep(1)
    pids = _worker_pids(run)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)   # must end, not hang in the AllReduce
    assert proc.returncode not in (0, None)
    assert "worker_1.log" in err and "finetune: error: msrun exited" in err, err[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] != "FINISHED" \
        if (run / "summary.json").is_file() else True


def test_world_size_must_split_over_nodes():
    from finetune.launch import local_workers
    from finetune.schema import ConfigError

    with pytest.raises(ConfigError, match="parallel.nodes=3"):
        local_workers(compose(["parallel=dp4", "parallel.nodes=3"]).parallel)
    assert local_workers(compose(["parallel=dp8", "parallel.nodes=2"]).parallel) == 4
