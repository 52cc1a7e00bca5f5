"""Shared test fixtures and helpers. `import finetune` first: it selects the protobuf backend MindSpore needs.

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
"""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import finetune  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONF = REPO / "conf"
FINETUNE = str(Path(sys.executable).with_name("finetune"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A small demo world (96 training questions, 24 test), a base pretrained for one epoch (~10 s),
# no reading texts in the corpus. Every test that runs `finetune` starts from this list.
QUICK = ["model.pretrain.epochs=1", "dataset.demo.num_words=40", "dataset.demo.num_reading=0",
         "dataset.demo.general_reading=0", "dataset.demo.squad_questions=0"]


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing (fail under CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"../shared not found: {path} is missing (real data and models live there, read in place)"
        if IN_CI:
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_path()


def compose(overrides=()):
    """The real conf/ composed with overrides, as `finetune` would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from finetune.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def resolved(overrides=()):
    """compose + finetune.checks.resolve: the read-only config the stages receive."""
    from finetune.checks import resolve

    return resolve(compose(overrides))


@pytest.fixture(scope="session")
def ms_cpu():
    """MindSpore in graph mode on CPU, once per session."""
    from finetune.model import setup_context

    cfg = compose()
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(REPO / "outputs" / "test-mindformers"))
    setup_context(cfg.hardware, 0)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_cmd(root: Path, run: str, args=(), quick: bool = True) -> list[str]:
    return [FINETUNE, f"output_root={root}", f"hydra.run.dir={Path(root) / run}", *(QUICK if quick else []), *args]


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a `finetune` started by start_finetune and everything it started (msrun and its workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def start_finetune(root: Path, run: str, args=(), quick: bool = True) -> subprocess.Popen:
    """`finetune` in the background, in its own process group; its stdout and stderr go to files
    (root/<run>.out, .err: a pipe nobody reads would stall it), read back with `output(proc)`."""
    out, err = Path(root) / f"{run}.out", Path(root) / f"{run}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(finetune_cmd(root, run, args, quick), cwd=root, text=True, start_new_session=True,
                                stdout=o, stderr=e)
    proc.out_path, proc.err_path = out, err
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    return proc.out_path.read_text(errors="replace"), proc.err_path.read_text(errors="replace")


def run_finetune(root: Path, run: str, args=(), quick: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `finetune` to the end; on timeout (or any error here) its whole process group is killed."""
    proc = start_finetune(root, run, args, quick)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, *output(proc))


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id) -> Path:
    """A folder every pytest-xdist worker of this session sees (the workers' common base temp);
    without xdist, this process's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def built_once(folder: Path, build) -> Path:
    """`folder`, made by build(folder) in whichever worker asks first; the others wait for it (a file
    lock) and reuse it. A build that failed half-way is started again by the next worker to ask."""
    import shutil

    from filelock import FileLock

    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".complete").touch()
    return folder


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


def with_cache(root: Path, cache: Path, new_store) -> Path:
    """root as an output_root with its own MLflow store and the session's shared cache/ (prepared
    data and base weights; jobs that prepare other data add to it, safely, as concurrent jobs do)."""
    new_store(root)
    (root / "cache").symlink_to(cache, target_is_directory=True)
    return root


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
    from finetune.tracking import default_uri

    root = tmp_path_factory.mktemp("store-template")
    MlflowClient(default_uri(root)).search_experiments()
    return root / "mlflow.db"


@pytest.fixture(scope="session")
def new_store(store_template):
    """new_store(root) -> the URI of a fresh store at root/mlflow.db (a copy of the template)."""
    import shutil
    from finetune.tracking import default_uri

    def make(root: Path) -> str:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(store_template, Path(root) / "mlflow.db")
        return default_uri(root)
    return make


# The reference training run that several modules compare against: 96 training questions / batch 16
# = 6 steps per epoch; 5 epochs = 30 steps, checkpoints at 6, 12, 18, 24, 30; dropout off, so the
# run is a deterministic function of its data order (resume and data parallel must reproduce it).
REFERENCE = ["train.epochs=5", "lora.dropout=0", "stages=[prepare,train]", "train.save.num_checkpoints=5"]


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
LONGEST_FIRST = ("test_pipeline", "test_parallel", "test_sweep", "test_server", "test_resume", "test_train_eval",
                 "test_hf_import", "test_health", "test_bench_smoke", "test_merge_export", "test_concurrency")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
