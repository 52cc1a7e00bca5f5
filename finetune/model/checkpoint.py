"""MindSpore checkpoint files: the one reader (numpy out, one-line errors) and the one writer
(atomic: a temp file in the same folder, then rename)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.errors import ModelError
from finetune.files import atomic_path


def read_checkpoint(path: str | Path, what: str, names=None) -> dict[str, np.ndarray]:
    """Entries of a MindSpore checkpoint as numpy (only `names`, when given), with a one-line
    error naming the file for a missing, truncated or foreign one. The one checkpoint reader."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what}: checkpoint {path} not found")
    try:
        raw = ms.load_checkpoint(str(path), choice_func=(lambda n: n in names) if names is not None else None)
    except Exception as e:  # truncated / not a checkpoint: name the file, not MindSpore's internals
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{what}: cannot read {path} as a MindSpore checkpoint ({first})") from None
    return {k: v.asnumpy() for k, v in raw.items()}


def save_checkpoint(params: list, path: str | Path) -> None:
    """Write [(name, Parameter | Tensor | ndarray)] atomically: a temp file in the same folder, then rename."""
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".ckpt":
        raise ModelError(f"checkpoint file names must end in .ckpt (MindSpore appends it otherwise): {path}")
    with atomic_path(path, ".ckpt") as tmp:
        ms.save_checkpoint([{"name": name, "data": ms.Tensor(p) if isinstance(p, np.ndarray) else p}
                            for name, p in params], str(tmp))
