"""Jobs sharing one output_root: three `finetune` processes started at once on a fresh folder (no
MLflow store, no prepared data, no base in the cache) all finish, each with its own MLflow run,
reading one prepared-data folder and one base checkpoint that none of them deleted under another."""
import json
import time

import pytest
from mlflow.tracking import MlflowClient

from finetune.tracking.store import default_uri
from helpers import kill_group, output, start_finetune

# A random-init base (no pretraining) keeps each job to its start-up, data preparation and the
# base's first save: the parts that race.
ARGS = ["model.pretrain.epochs=0", "stages=[prepare]"]


@pytest.mark.process
def test_three_jobs_at_once_on_a_fresh_output_root(tmp_path):
    procs = [start_finetune(tmp_path, f"job{i}", ARGS) for i in range(3)]
    try:
        deadline = time.time() + 600
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            kill_group(p)
    for i, p in enumerate(procs):
        out, err = output(p)
        assert p.returncode == 0, f"job{i}: {err[-3000:]}"
        assert "Traceback" not in err
    summaries = [json.loads((tmp_path / f"job{i}" / "summary.json").read_text()) for i in range(3)]
    assert all(s["status"] == "FINISHED" for s in summaries)
    # one prepared-data folder and one base checkpoint, complete, shared by all three
    assert len({s["prepared_data"] for s in summaries}) == 1 and len({s["base_checkpoint"] for s in summaries}) == 1
    data = list((tmp_path / "cache" / "data").iterdir())
    assert [d.name for d in data] == [tmp_path.joinpath(summaries[0]["prepared_data"]).name]
    assert (data[0] / "meta.json").is_file()
    assert [p.name for p in (tmp_path / "cache" / "base").iterdir()] == [tmp_path.joinpath(summaries[0]["base_checkpoint"]).name]
    # one store, one experiment, three runs
    client = MlflowClient(default_uri(tmp_path))
    exp = client.get_experiment_by_name("finetune")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(s["mlflow_run_id"] for s in summaries)
    assert all(r.info.status == "FINISHED" for r in runs)
