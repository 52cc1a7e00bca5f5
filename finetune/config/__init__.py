"""The config: its typed schema, every cross-key check, a Hugging Face folder's config.json as model keys.

The names below are the package's face: what stages and the entrypoint import."""

from finetune.config.checks import resolve
from finetune.config.hf_config import is_hf_dir
from finetune.config.schema import STAGES, Config, register

__all__ = ["Config", "STAGES", "is_hf_dir", "register", "resolve"]
