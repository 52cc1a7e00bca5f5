"""Multi-device runs through MindSpore's `msrun`: the entrypoint re-launches itself as msrun workers.

World size = parallel.data_parallel x model_parallel x pipeline_stage, spread evenly over
parallel.nodes machines. Workers get the same command-line overrides plus the parent's run
directory, so every process composes the same config (no second config file). The env var
FINETUNE_WORKER marks a worker, which never launches again.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune import rundir
from finetune.errors import ConfigError, LaunchError

WORKER_ENV = "FINETUNE_WORKER"
WORKER_SCRIPT = Path(__file__).resolve().parent / "msrun_worker" / "worker.py"


def world_size(par) -> int:
    return par.data_parallel * par.model_parallel * par.pipeline_stage


def local_workers(par) -> int:
    """Workers on this node (the world size splits evenly over the nodes: checks.py)."""
    return world_size(par) // par.nodes


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a single-node job's msrun master."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_port(par) -> int:
    """parallel.master_port, or (0, single node: checks.py) a free port: two jobs on one machine never collide."""
    return par.master_port or free_port()


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def rank() -> int:
    """This process's global rank (0 outside msrun)."""
    return int(os.environ.get("RANK_ID", os.environ.get("RANK", "0"))) if is_worker() else 0


def _without_credentials(override: str) -> str:
    """tracking.uri=http://user:pw@host -> tracking.uri=http://host: msrun logs its workers' command
    lines; the credentials reach them through MLflow's environment variables (redact.use_credentials)."""
    from finetune.runtime.redact import split_credentials

    key, _, value = override.partition("=")
    return f"{key}={split_credentials(value)[0]}" if key.lstrip("+") == "tracking.uri" else override


def msrun_command(cfg, run_dir: Path, overrides: list[str], port: int | None = None) -> list[str]:
    """The exact msrun command line that runs this config on parallel.nodes x local workers.
    On a multi-node job every node runs it with its own parallel.node_rank."""
    par = cfg.parallel
    local = local_workers(par)
    run_dir = Path(run_dir).resolve()
    return [
        "msrun",
        f"--worker_num={world_size(par)}",
        f"--local_worker_num={local}",
        f"--master_addr={par.master_addr}",
        f"--master_port={port or par.master_port or '<a free port>'}",
        f"--node_rank={par.node_rank}",
        f"--log_dir={run_dir / 'msrun'}",
        "--join=True",
        "--tail_worker_log=0",   # the console follows rank 0; every rank's log is in msrun/worker_N.log
        f"--cluster_time_out={par.join_timeout}",
        str(WORKER_SCRIPT),
        *[_without_credentials(o) for o in overrides if not o.startswith("hydra.run.dir=")],
        f"hydra.run.dir={run_dir}",
        # workers log to stdout (msrun keeps it in msrun/worker_N.log) and leave .hydra/ to the launcher
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]


def init_worker(hw, seed: int) -> int:
    """Inside an msrun worker: set the device context, join the communication group, return
    this process's global rank."""
    from mindspore.communication import get_rank, init

    from finetune.model.llama import setup_context

    setup_context(hw, seed)
    init()
    return get_rank()


def launch(cfg, run_dir: Path) -> dict:
    """Run this job on world_size msrun workers and wait; returns rank 0's summary.json. The caller
    builds the prepared data and the base model first, so the workers find both in the cache."""
    import json
    import shutil
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("parallel: multi-device runs are launched from the `finetune` command line "
                          "(workers re-compose its config from the same overrides)")
    if shutil.which("msrun") is None and not (Path(sys.executable).parent / "msrun").is_file():
        raise ConfigError("parallel: msrun (MindSpore's launcher) not found next to this python")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = msrun_command(cfg, run_dir, list(HydraConfig.get().overrides.task), master_port(cfg.parallel))
    cmd[0] = shutil.which("msrun") or str(Path(sys.executable).parent / "msrun")
    print(f"finetune: launching {world_size(cfg.parallel)} workers: {' '.join(cmd)}", file=sys.stderr, flush=True)   # no credentials: see _without_credentials
    # msrun starts workers as `python worker.py`: put this interpreter's folder (the venv) first.
    env = {**os.environ, WORKER_ENV: "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # msrun's own messages (stderr) are passed through and kept: its first "Worker process PID exit
    # with exception" line names the worker that died first, the root cause of the failure.
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stderr=subprocess.PIPE, text=True, errors="replace")
    msrun_lines = []
    for line in proc.stderr:
        sys.stderr.write(line)
        msrun_lines.append(line)
    proc.wait()
    summary_file = run_dir / rundir.SUMMARY
    if proc.returncode != 0:
        raise LaunchError(f"msrun exited with {proc.returncode}; {worker_failure(run_dir / 'msrun', msrun_lines)}")
    if cfg.parallel.node_rank != 0:
        return {}   # rank 0 (on node 0) tracks the run and writes its summary
    if not summary_file.is_file():
        raise LaunchError(f"msrun finished but rank 0 wrote no {summary_file}; see {run_dir / 'msrun'}")
    return json.loads(summary_file.read_text())


def worker_failure(log_dir: Path, msrun_lines: list[str] = (), tail: int = 15) -> str:
    """Which worker failed first and the end of its log. msrun names the first worker process to
    exit badly by pid; each worker prints its pid at start (msrun_worker/worker.py)."""
    import re

    logs = sorted(Path(log_dir).glob("worker_*.log"))
    texts = {f: f.read_text(errors="replace") for f in logs}
    for line in msrun_lines:
        m = re.search(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)", line)
        if not m:
            continue
        pid, code = m.groups()
        for f, text in texts.items():
            if f"finetune worker pid {pid} " in text:
                how = f"killed by signal {-int(code)}" if int(code) < 0 else f"exit code {code}"
                return f"{f.name} failed first ({how}):\n" + "\n".join(text.splitlines()[-tail:])
    for f, text in texts.items():
        lines = text.splitlines()
        marks = [i for i, line in enumerate(lines) if "finetune: error:" in line or line.startswith("Traceback")]
        if marks:
            start = max(0, min(marks[0], len(lines) - tail))
            return f"{f.name} failed:\n" + "\n".join(lines[start:start + tail])
    return f"no worker log shows an error; see {log_dir}"
