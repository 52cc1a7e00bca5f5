"""`finetune-compare`: runs in a real MLflow SQLite store -> mlflow.search_runs -> an aligned table."""
import pytest

from finetune.tracking.compare import compare_table, load_runs, main
from finetune.tracking.tracker import SWEEP_EXPERIMENT_ENV, SWEEP_JOB_ENV, SWEEP_PARENT_ENV, SWEEP_URI_ENV, Tracker

# name: (lora.rank, mc_accuracy, contest_score); "none" finished no evaluation.
RUNS = {"r8": (8, 0.50, 0.61), "r4": (4, 0.75, 0.70), "r16": (16, 0.625, 0.55), "none": (8, None, None)}


@pytest.fixture(scope="session")   # session: kept even if xdist interleaves modules
def store(tmp_path_factory, new_store):
    root = tmp_path_factory.mktemp("compare")
    uri = new_store(root)
    ids = {}
    for name, (rank, acc, contest) in RUNS.items():
        t = Tracker(uri, "cmp", name)
        t.log_params({"lora.rank": str(rank), "lora.alpha": "16.0", "optimizer.learning_rate": "5e-05"})
        if acc is not None:
            t.log_metrics({"mc_accuracy": acc, "contest_score": contest, "trainable_ratio_pct": 0.1 * rank,
                           "squad_f1": 40.0 + rank})
        t.end("FINISHED" if acc is not None else "FAILED")
        ids[name] = t.run_id
    # A sweep: its parent (tag sweeper) repeats the best child's figures and is left out of the listing.
    parent = Tracker(uri, "cmp", "sweep", tags={"sweeper": "BasicSweeper"})
    parent.log_metrics({"mc_accuracy": 0.9})
    ids["sweep"] = parent.run_id
    env = {SWEEP_PARENT_ENV: parent.run_id, SWEEP_URI_ENV: uri, SWEEP_EXPERIMENT_ENV: "cmp"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for job, acc in enumerate((0.25, 0.875)):
            mp.setenv(SWEEP_JOB_ENV, str(job))
            child = Tracker(uri, "cmp", str(job))
            child.log_metrics({"mc_accuracy": acc})
            child.end("FINISHED")
            ids[f"child{job}"] = child.run_id
    parent.end("FINISHED")
    return uri, ids


def _names(table: str) -> list[str]:
    return [line.split()[0] for line in table.splitlines()[2:]]


def test_table_sorted_by_the_objective(store):
    uri, _ = store
    runs = load_runs(uri, "cmp")
    assert len(runs) == 6                                         # 4 runs + 2 sweep children, no parent
    table = compare_table(runs)
    assert _names(table) == ["sweep-1", "r4", "r16", "r8", "sweep-0", "none"]   # missing value last
    # runs without the value keep MLflow's order (newest first) after the others
    assert _names(compare_table(runs, "contest_score")) == ["r4", "r8", "r16", "sweep-1", "sweep-0", "none"]
    assert _names(compare_table(runs, "mc_accuracy", ascending=True))[:2] == ["sweep-0", "r8"]
    assert _names(compare_table(runs, "lora.rank"))[0] == "r16"   # a param sorts too (numerically)


def test_table_columns_are_aligned_and_formatted(store):
    uri, ids = store
    lines = compare_table(load_runs(uri, "cmp")).splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "status", "rank", "alpha"] and header[-1] == "run_id"
    for col in ("mc_acc", "squad_f1", "ret_f1", "train%", "contest", "seconds"):
        assert col in header
    assert set(lines[1]) <= {"-", " "}
    r4 = next(line for line in lines if line.startswith("r4 "))
    cells = dict(zip(header, r4.split()))
    assert cells["mc_acc"] == "0.7500" and cells["contest"] == "0.7000" and cells["rank"] == "4"
    assert cells["squad_f1"] == "44.0000" and cells["ret_f1"] == "-" and cells["train%"] == "0.400"
    assert cells["run_id"] == ids["r4"] and cells["status"] == "FINISHED"
    # right-aligned numbers: every row's mc_acc column ends at the same position as its header
    end = lines[0].index("mc_acc") + len("mc_acc")
    assert all(line[end - 1] != " " for line in lines[2:])


def test_parent_lists_only_that_sweeps_children(store):
    uri, ids = store
    runs = load_runs(uri, "cmp", parent=ids["sweep"])
    assert set(runs["run_id"]) == {ids["child0"], ids["child1"]}
    assert _names(compare_table(runs)) == ["sweep-1", "sweep-0"]


def test_main_prints_the_table(store, capsys):
    uri, ids = store
    assert main(["cmp", "--tracking-uri", uri, "--parent", ids["sweep"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"experiment 'cmp' in {uri}: 2 children of sweep run {ids['sweep']}, sorted by mc_accuracy " \
                     "(best first)"
    assert [line.split()[0] for line in out[3:]] == ["sweep-1", "sweep-0"]


def test_main_errors_are_one_line(store, capsys, tmp_path):
    uri, _ = store
    assert main(["nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune-compare: error: no experiment 'nope' in ") and "cmp" in err
    assert main(["cmp", "--tracking-uri", uri, "--sort", "bogus"]) == 2
    assert "--sort bogus: no such metric or param" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["cmp", "--tracking-uri", missing]) == 2
    assert capsys.readouterr().err == f"finetune-compare: error: no MLflow store at {missing} " \
                                      "(run a job first, or pass --tracking-uri)\n"
    assert not (tmp_path / "absent.db").exists()                  # not created by looking
