"""The process: msrun launch and workers, the run context, summary.json, signals, logs, memory,
redaction of credentials.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.runtime.context import RunContext
from finetune.runtime.launch import init_worker, is_worker, launch, msrun_command, rank, world_size
from finetune.runtime.logs import quiet_libraries
from finetune.runtime.memory import peak_rss_gb
from finetune.runtime.redact import redact, redact_files, redact_logging, use_credentials
from finetune.runtime.signals import Interrupted, exit_code, received, sigterm_as_interrupt
from finetune.runtime.summary import earlier_runs, training_run_id, write_summary

__all__ = [
    "Interrupted",
    "RunContext",
    "earlier_runs",
    "exit_code",
    "init_worker",
    "is_worker",
    "launch",
    "msrun_command",
    "peak_rss_gb",
    "quiet_libraries",
    "rank",
    "received",
    "redact",
    "redact_files",
    "redact_logging",
    "sigterm_as_interrupt",
    "training_run_id",
    "use_credentials",
    "world_size",
    "write_summary",
]
