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

from .schema import ConfigError

WORKER_ENV = "FINETUNE_WORKER"
WORKER_SCRIPT = Path(__file__).resolve().parent / "msrun_worker" / "worker.py"


def world_size(par) -> int:
    return par.data_parallel * par.model_parallel * par.pipeline_stage


def local_workers(par) -> int:
    world = world_size(par)
    if par.nodes < 1 or world % par.nodes:
        raise ConfigError(f"parallel.nodes={par.nodes}: the world size {world} (data_parallel x model_parallel x "
                          f"pipeline_stage) must split evenly over the nodes")
    if not 0 <= par.node_rank < par.nodes:
        raise ConfigError(f"parallel.node_rank={par.node_rank}: expected 0..{par.nodes - 1}")
    return world // par.nodes


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def rank() -> int:
    """This process's global rank (0 outside msrun)."""
    return int(os.environ.get("RANK_ID", os.environ.get("RANK", "0"))) if is_worker() else 0


def msrun_command(cfg, run_dir: Path, overrides: list[str]) -> list[str]:
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
        f"--master_port={par.master_port}",
        f"--node_rank={par.node_rank}",
        f"--log_dir={run_dir / 'msrun'}",
        "--join=True",
        f"--cluster_time_out={par.join_timeout}",
        str(WORKER_SCRIPT),
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
