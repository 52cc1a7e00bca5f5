"""Training checkpoints: evenly spaced over the run, written atomically, verified by checksum, resumable.

A checkpoint at optimizer step N is two files in <run dir>/checkpoints/:
  adapter-stepN.ckpt  the LoRA weights (what merge/evaluate read; see lora.save_adapter)
  state-stepN.ckpt    everything else resume needs: AdamW moments + global_step (which drives the
                      LR schedule), the dynamic loss scale and its counter, the step number
and one line in index.json ({"step", "adapter", "state", "sha256": {file: digest}}), rewritten
(temp file + rename) only after both files are complete. A kill during a save therefore leaves
the previous checkpoint as the newest complete one; a file damaged later is caught by its
sha256, reported, and the one before it is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("finetune.checkpoints")

INDEX = "index.json"
RUN_RECORD = "run.json"   # the settings that shaped these checkpoints (train.training_settings)


def save_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """K evenly spaced optimizer steps, the last one = total_steps.
    E.g. 10 epochs of 12 steps, K=5 -> [24, 48, 72, 96, 120] (epochs 2, 4, 6, 8, 10)."""
    if num_checkpoints <= 0 or total_steps <= 0:
        return []
    k = min(num_checkpoints, total_steps)
    return sorted({round(total_steps * i / k) for i in range(1, k + 1)})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index(ckpt_dir: Path) -> list[dict]:
    f = Path(ckpt_dir) / INDEX
    return json.loads(f.read_text()) if f.is_file() else []


def add_to_index(ckpt_dir: Path, step: int, files: dict[str, Path]) -> None:
    """Record a complete checkpoint (call after its files are renamed into place)."""
    ckpt_dir = Path(ckpt_dir)
    entries = [e for e in read_index(ckpt_dir) if e["step"] != step]
    entries.append({"step": step, **{k: p.name for k, p in files.items()},
                    "sha256": {p.name: sha256(p) for p in files.values()}})
    entries.sort(key=lambda e: e["step"])
    tmp = ckpt_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(ckpt_dir / INDEX)


def verify(ckpt_dir: Path, entry: dict) -> str | None:
    """None when every file of the checkpoint is present with its recorded sha256, else why not."""
    for name, digest in entry["sha256"].items():
        f = Path(ckpt_dir) / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256(f) != digest:
            return f"{f} is corrupt or truncated (sha256 differs from {INDEX})"
    return None


def newest_valid(ckpt_dir: Path) -> dict | None:
    """The newest checkpoint whose files verify; each one skipped is reported."""
    for entry in reversed(read_index(ckpt_dir)):
        problem = verify(ckpt_dir, entry)
        if problem is None:
            return entry
        log.warning("checkpoint at step %d unusable: %s; trying the previous one", entry["step"], problem)
    return None


def write_run_record(ckpt_dir: Path, settings: dict) -> None:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (RUN_RECORD + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    tmp.replace(ckpt_dir / RUN_RECORD)


def read_run_record(ckpt_dir: Path) -> dict | None:
    f = Path(ckpt_dir) / RUN_RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def setting_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """{key: (current, recorded)} for every setting whose value differs, or that only one side has."""
    return {k: (current.get(k), recorded.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}


def select_best(scores: list[dict]) -> dict | None:
    """The checkpoint to keep: highest mc_accuracy among those not known to have lost SQuAD
    ability (retained False); ties go to the earlier step (less training, same score)."""
    eligible = [s for s in scores if s.get("retained") is not False]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s["mc_accuracy"], -s["step"]))
