"""Shared test fixtures. `import finetune` first: it selects the protobuf backend MindSpore needs."""
import os
from pathlib import Path

import finetune  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONF = REPO / "conf"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not found: {path} is missing (real data and models live there, read in place)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: the real MMLU/CMMLU/tokenizer files live there")
    return SHARED


def compose(overrides=()):
    """The real conf/ composed with overrides, as `finetune` would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from finetune.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def ms_cpu():
    """MindSpore in graph mode on CPU, once per session."""
    from finetune.model import setup_context

    cfg = compose()
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(REPO / "outputs" / "test-mindformers"))
    setup_context(cfg.hardware, 0)
    return cfg
