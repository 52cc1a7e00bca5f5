"""What every stage receives: a small frozen record of the run's artifacts. Stages load what they
need from these files; nothing else passes between them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """What stages and the training loop may call on the run's tracker. The MLflow implementation is
    finetune.tracking.tracker.Tracker (a no-op when it has no store: ranks other than 0); tests may
    pass any object with these methods."""
    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def continue_steps(self, key: str) -> int: ...
    def flush(self) -> None: ...


@dataclass(frozen=True)
class RunContext:
    cfg: Any                    # the resolved, read-only config (checks.resolve)
    run_dir: Path               # where the stage writes its files
    prepared: Path | None       # the prepared-data folder (prepare.prepare); None for a plan-only run
    base_checkpoint: Path | None  # the base weights as a MindSpore checkpoint (base.resolve_base)
    tok: Any                    # the tokenizer (tokenizer.load_tokenizer)
    tracker: Tracker            # the MLflow run, or a silent one on ranks other than 0
    rank: int = 0               # this process's data-parallel rank
    given: frozenset[str] = field(default_factory=frozenset)   # config keys set on the command line

    def load_base(self, batch_size: int):
        """The base model with its weights, for a stage's batch size."""
        from finetune.model.llama import load_model

        return load_model(self.cfg.model, self.cfg.hardware, self.tok, batch_size, self.base_checkpoint)
