"""The one user-facing error type. Anything raised as a `UserError` is bad input or a bad
state that the user can fix: `finetune` prints it as one line, `finetune: error: <message>`, and
exits with `exit_code` (no traceback). Subclasses only say where the problem was found."""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is one line naming the key, file or row."""
    exit_code = 2


class ConfigError(UserError):
    """A config value the schema's types cannot rule out (the message names the key)."""


class DataError(UserError):
    """Bad input data (the message names the file, and the line or record)."""


class ModelError(UserError):
    """A model, checkpoint or adapter problem found before long work starts."""


class TokenizerError(UserError):
    """A tokenizer file is missing or unusable."""


class LaunchError(UserError):
    """msrun or one of its workers failed; the message carries the failing worker's log tail."""
    exit_code = 1


class TrainingDiverged(UserError):
    """Loss or gradients stopped being finite: the run stops (FAILED), the last good checkpoint kept."""
    exit_code = 1
