"""Training: the jit step and loop, checkpoints and the resume policy, during-training evaluation,
the step log, the demo's base pretraining.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.training.base import resolve_base
from finetune.training.checkpoints import (
    add_to_index,
    check_fresh_run_dir,
    read_index,
    resume_point,
    save_steps,
    training_settings,
    write_run_record,
)
from finetune.training.during import DuringTraining
from finetune.training.loop import (
    Schedule,
    TrainingJob,
    packed_feed,
    packed_step_rows,
    row_feed,
    run_steps,
    total_steps,
)
from finetune.training.train_log import read_rows

__all__ = [
    "DuringTraining",
    "Schedule",
    "TrainingJob",
    "add_to_index",
    "check_fresh_run_dir",
    "packed_feed",
    "packed_step_rows",
    "read_index",
    "read_rows",
    "resolve_base",
    "resume_point",
    "row_feed",
    "run_steps",
    "save_steps",
    "total_steps",
    "training_settings",
    "write_run_record",
]
