"""Writes that a reader never sees half done: the file is written beside its target (same folder, so
the final os.replace is a rename, not a copy), flushed to disk, then renamed into place. A crash or a
full disk leaves the old file (or none) and no temp file behind."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """A temp path to write `path` through; renamed onto `path` when the block ends without error,
    deleted when it raises. The temp name carries the process id (msrun workers may write the same
    file) and keeps `suffix` last (MindSpore appends .ckpt to a checkpoint name without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    stem = path.name[:len(path.name) - len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    tmp = path.with_name(f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:   # on disk before the rename, so the rename never publishes a hole
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data, **dumps) -> None:
    """JSON, UTF-8, written atomically; `dumps` go to json.dumps (indent=1 unless given)."""
    dumps.setdefault("indent", 1)
    write_text(path, json.dumps(data, **dumps) + "\n")
