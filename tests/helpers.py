"""What tests share besides fixtures (those are in conftest.py): paths, the quick demo overrides,
composing the real conf/, running `finetune` as a subprocess in its own process group, and the
tiers (marks `process` and `slow`, both left out by `make test-fast`): every process a test starts
goes through spawn() / run_process() here, which fail a test that is not marked `process`."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

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


def compose(overrides=()):
    """The real conf/ composed with overrides, as `finetune` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from finetune.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def resolved(overrides=()):
    """compose + finetune.config.checks.resolve: the read-only config the stages receive."""
    from finetune.config.checks import resolve

    return resolve(compose(overrides))


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- tiers
# `make test` runs everything; `make test-fast` (-m "not process and not slow", ~2 min) only tests
# that stay in the pytest process and compile no MindSpore graph.
# - `process`: the test starts a process of its own (the `finetune` command, msrun, an MLflow
#   server, another Python): marked by hand, or by conftest when it uses a fixture that starts one
#   (PROCESS_FIXTURES). Every such start goes through spawn() or run_process(), which fail the test
#   being set up or run if it is not marked, in either tier: a forgotten mark cannot slip a
#   subprocess into the fast tier.
# - `slow`: the test builds and runs MindSpore models (tens of seconds each on 2 CPU cores, most of
#   it graph compilation): marked by conftest when it uses a fixture in SLOW_FIXTURES (every test
#   that builds a model takes `ms_cpu`, the MindSpore context), or by hand.
PROCESS_MARK = "process"
SLOW_MARK = "slow"
# Fixtures that start processes (conftest's `finetune` jobs, test_server's MLflow server): a test
# that uses one, directly or through another fixture, is marked `process` by conftest.
PROCESS_FIXTURES = frozenset({"quick_cache", "reference_run", "server"})
SLOW_FIXTURES = frozenset({"ms_cpu"})


class Running:
    """The test pytest is setting up, running or tearing down (set by conftest.pytest_runtest_setup);
    None outside a test."""
    item = None


def check_may_start(what: str) -> None:
    item = Running.item
    if item is not None and item.get_closest_marker(PROCESS_MARK) is None:
        pytest.fail(f"{item.nodeid} starts {what} but is not marked @pytest.mark.{PROCESS_MARK}: mark it (or the "
                    f"fixture that starts it: helpers.PROCESS_FIXTURES) so that `make test-fast` leaves it out",
                    pytrace=False)


def _what(cmd) -> str:
    return " ".join(Path(str(c)).name if i == 0 else str(c) for i, c in enumerate(list(cmd)[:3]))


def spawn(cmd, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kwargs) for a test marked `process` (else the test fails, saying so)."""
    check_may_start(_what(cmd))
    return subprocess.Popen(cmd, **kwargs)


def run_process(cmd, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, **kwargs) for a test marked `process` (else the test fails, saying so)."""
    check_may_start(_what(cmd))
    return subprocess.run(cmd, **kwargs)


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
    check_may_start("finetune")   # before its files are made
    out, err = Path(root) / f"{run}.out", Path(root) / f"{run}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = spawn(finetune_cmd(root, run, args, quick), cwd=root, text=True, start_new_session=True,
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


def with_cache(root: Path, cache: Path, new_store) -> Path:
    """root as an output_root with its own MLflow store and the session's shared cache/ (prepared
    data and base weights; jobs that prepare other data add to it, safely, as concurrent jobs do)."""
    new_store(root)
    (root / "cache").symlink_to(cache, target_is_directory=True)
    return root


# The reference training run that several modules compare against: 96 training questions / batch 16
# = 6 steps per epoch; 5 epochs = 30 steps, checkpoints at 6, 12, 18, 24, 30; dropout off, so the
# run is a deterministic function of its data order (resume and data parallel must reproduce it).
REFERENCE = ["train.epochs=5", "lora.dropout=0", "stages=[prepare,train]", "train.save.num_checkpoints=5"]
