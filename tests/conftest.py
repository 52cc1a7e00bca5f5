"""Shared test fixtures (helpers.py holds the rest).

- `shared` / `shared_path`: real data in ../shared, read in place. Absent: skipped with a message,
  except under CI (CI=true), where its absence fails the test.
- QUICK: the one list of overrides for a quick demo job (small world, 1-epoch base); tests add
  only what they are about.
- `quick_root`: an output_root whose cache already holds the QUICK base (pretrained once per
  session, shared by all pytest-xdist workers through `built_once`) and whose MLflow store exists;
  tests run `finetune` jobs in it with their own run dirs. `reference_run`: one training run that
  resume and data-parallel tests compare against, also built once per session.
- `run_finetune` / `start_finetune`: the `finetune` command as a subprocess in its own process
  group, killed with everything it started (msrun workers) if the test fails or times out.
- The tiers (helpers.py): a test that starts a process is marked `process`, one that runs MindSpore
  models `slow`; the users of a fixture in helpers.PROCESS_FIXTURES / SLOW_FIXTURES are marked
  here. `make test-fast` deselects both.
- Order: LONGEST_FIRST below, unless pytest-randomly shuffles (`make test-shuffled SEED=...`).
"""
import finetune  # noqa: F401  (first: it selects the protobuf backend MindSpore needs, before MLflow or Hydra load protobuf)

# isort: split
import os
from pathlib import Path

import pytest

import helpers
from helpers import (PROCESS_FIXTURES, PROCESS_MARK, REFERENCE, REPO, SLOW_FIXTURES, SLOW_MARK, built_once, compose,
                     run_finetune, shared_path, with_cache)


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def ms_cpu():
    """MindSpore in graph mode on CPU, once per session."""
    from finetune.model.llama import setup_context

    cfg = compose()
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(REPO / "outputs" / "test-mindformers"))
    setup_context(cfg.hardware, 0)
    return cfg


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' common base temp);
    without xdist, this process's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


@pytest.fixture(scope="session")
def quick_cache(shared_tmp, new_store) -> Path:
    """An output_root cache/ folder holding the QUICK base, pretrained once per test session (all
    workers) by a `prepare` job, and its prepared data."""
    def warm(root: Path) -> None:
        new_store(root)
        proc = run_finetune(root, "warm", ["stages=[prepare]"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(list((root / "cache" / "base").glob("*.ckpt"))) == 1
    return built_once(shared_tmp / "quick-warm", warm) / "cache"


@pytest.fixture(scope="session")
def quick_root(tmp_path_factory, new_store, quick_cache) -> Path:
    """An output_root whose cache already holds the QUICK base (pretrained once per session) and
    whose MLflow store exists: jobs started in it skip both. One per worker; tests give their jobs
    their own run dirs."""
    return with_cache(tmp_path_factory.mktemp("quick"), quick_cache, new_store)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created (migrated) once per session: creating one costs seconds,
    copying this file costs nothing. Use new_store(root)."""
    from mlflow.tracking import MlflowClient

    from finetune.tracking.store import default_uri

    root = tmp_path_factory.mktemp("store-template")
    MlflowClient(default_uri(root)).search_experiments()
    return root / "mlflow.db"


@pytest.fixture(scope="session")
def new_store(store_template):
    """new_store(root) -> the URI of a fresh store at root/mlflow.db (a copy of the template)."""
    import shutil

    from finetune.tracking.store import default_uri

    def make(root: Path) -> str:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(store_template, Path(root) / "mlflow.db")
        return default_uri(root)
    return make


@pytest.fixture(scope="session")
def reference_run(shared_tmp, quick_cache, new_store) -> Path:
    """The reference run dir (REFERENCE on the QUICK base), run once per test session (all workers),
    in its own output_root (reference_run.parent) beside the shared cache."""
    def run(root: Path) -> None:
        with_cache(root, quick_cache, new_store)
        proc = run_finetune(root, "reference", REFERENCE)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return built_once(shared_tmp / "reference-root", run) / "reference"


# pytest-xdist (`make test`: two workers, --dist loadfile) hands out whole modules in collection
# order, a new one to whichever worker is free. Longest first (measured: minutes each), so that no
# worker is left alone with a long module at the end.
LONGEST_FIRST = ("test_real_model", "test_pipeline", "test_parallel", "test_sweep", "test_server", "test_resume", "test_train_eval",
                 "test_hf_import", "test_run_options", "test_health", "test_bench_smoke", "test_merge_export",
                 "test_concurrency")


@pytest.hookimpl(tryfirst=True)   # before the -m selection, which reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(PROCESS_MARK)
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(SLOW_MARK)
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize", False):
        return   # shuffled (pytest-randomly ran first): keep its order
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.hookimpl(tryfirst=True)   # before the test's fixtures are set up: they may start processes
def pytest_runtest_setup(item):
    helpers.Running.item = item
