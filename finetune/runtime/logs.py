"""A quiet terminal: MindFormers' and MindSpore's logs go to the run's log files; the terminal keeps
our own one-line messages, progress bars and the final summary. `hydra.verbose=true` shows all.

MindFormers logs through a logger named after its output folder (the LOCAL_DEFAULT_PATH variable):
`mindformers<path>/log`, created on first use with a stdout handler at INFO and its own files
(<path>/log/rank_N/info.log, error.log). So the variable is set once per job, before MindFormers is
first imported, and that logger's terminal handler is turned off; its files keep every line.
mindpet (mindformers.pet's LoRA) logs "[SDK] ..." lines to stdout the same way; its own files keep
them. MindSpore's C++ log is at errors only (GLOG_v=3, finetune/__init__.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

OFF = logging.CRITICAL + 1


def library_log_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "mindformers" / (f"rank{rank}" if rank else "")


def quiet_libraries(run_dir: Path, rank: int = 0, verbose: bool = False) -> Path:
    """Point MindFormers' output folder at <run_dir>/mindformers[/rankN] (its logs and the
    adapter_config.json that mindformers.pet writes) and keep its lines off the terminal."""
    folder = library_log_dir(run_dir, rank)
    os.environ["LOCAL_DEFAULT_PATH"] = str(folder)
    if verbose:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # import-time warnings (e.g. "Import PyNativeQwen3ForCausalLM failed: No module named 'hyper_parallel'")
    with open(folder / "import.log", "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        import mindformers  # noqa: F401
        from mindformers.tools.logger import get_logger

        get_logger()   # the logger for this folder, created now so its handlers can be turned down
        from mindpet.log import log as pet_log  # mindformers.pet's "[SDK] Start to freeze model" lines
    loggers = [lg for name, lg in logging.Logger.manager.loggerDict.items()
               if name.startswith("mindformers") and isinstance(lg, logging.Logger)]
    for lg in (pet_log.logger, pet_log.operation_logger):
        if not getattr(lg, "set_flag", True):   # mindpet adds its handlers on the first message: add them now
            lg.set_logger()
        loggers.append(lg)
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(OFF)
    return folder
