"""Training checkpoints: evenly spaced over the run, written atomically, verified by checksum, resumable.

A checkpoint at optimizer step N is two files in <run dir>/checkpoints/:
  adapter-stepN.ckpt  the LoRA weights (what merge/evaluate read; finetune/model/adapter.py save_adapter)
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

from finetune import rundir
from finetune.errors import ModelError
from finetune.files import write_json
from finetune.model.adapter import lora_differences, read_adapter

log = logging.getLogger(__name__)



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
    f = Path(ckpt_dir) / rundir.CHECKPOINT_INDEX
    return json.loads(f.read_text()) if f.is_file() else []


def add_to_index(ckpt_dir: Path, step: int, files: dict[str, Path]) -> None:
    """Record a complete checkpoint (call after its files are renamed into place)."""
    ckpt_dir = Path(ckpt_dir)
    entries = [e for e in read_index(ckpt_dir) if e["step"] != step]
    entries.append({"step": step, **{k: p.name for k, p in files.items()},
                    "sha256": {p.name: sha256(p) for p in files.values()}})
    entries.sort(key=lambda e: e["step"])
    write_json(ckpt_dir / rundir.CHECKPOINT_INDEX, entries)


def verify(ckpt_dir: Path, entry: dict) -> str | None:
    """None when every file of the checkpoint is present with its recorded sha256, else why not."""
    for name, digest in entry["sha256"].items():
        f = Path(ckpt_dir) / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256(f) != digest:
            return f"{f} is corrupt or truncated (sha256 differs from {rundir.CHECKPOINT_INDEX})"
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
    write_json(ckpt_dir / rundir.RUN_RECORD, settings, sort_keys=True)


def read_run_record(ckpt_dir: Path) -> dict | None:
    f = Path(ckpt_dir) / rundir.RUN_RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def setting_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """{key: (current, recorded)} for every setting whose value differs, or that only one side has."""
    return {k: (current.get(k), recorded.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}


def training_settings(cfg, prepared: Path | None = None) -> dict:
    """The settings recorded beside a run's checkpoints (checkpoints/run.json) and compared on resume.
    `data` (the prepared data's content-addressed folder) is known once data is prepared."""
    from omegaconf import OmegaConf

    out = {key: OmegaConf.select(cfg, key) for key in SETTINGS}
    out = {k: v if isinstance(v, (int, float, bool, type(None))) else str(v) for k, v in out.items()}
    out["train.global_batch"] = (cfg.train.batch_size * cfg.parallel.gradient_accumulation_steps
                                 * cfg.parallel.data_parallel)
    if prepared is not None:
        out["data"] = Path(prepared).name
    return out


def check_fresh_run_dir(cfg, run_dir: Path, clear: bool = False) -> None:
    """A new training run (train.resume=false) in a run dir that holds another run's checkpoints is
    refused, unless train.overwrite=true (then, with clear=True, that run's training files go)."""
    import shutil

    ckpt_dir = Path(run_dir) / rundir.CHECKPOINTS
    steps = [e["step"] for e in read_index(ckpt_dir)]
    if not steps:
        return
    if not cfg.train.overwrite:
        raise ModelError(f"train: {ckpt_dir} holds checkpoints of an earlier run (steps {', '.join(map(str, steps))}); "
                         "set train.resume=true to continue it, train.overwrite=true to replace it, "
                         "or choose another hydra.run.dir")
    if clear:
        log.warning("train.overwrite=true: deleting the earlier run's checkpoints (steps %s), adapter and train log "
                    "in %s", ", ".join(map(str, steps)), run_dir)
        shutil.rmtree(ckpt_dir)
        for name in (rundir.ADAPTER, rundir.TRAIN_LOG):
            (Path(run_dir) / name).unlink(missing_ok=True)


def resume_point(cfg, run_dir: Path, settings: dict | None = None) -> dict:
    """train.resume=true: the newest checkpoint in run_dir/checkpoints whose files verify, which must
    have been trained with the same settings (training_settings; checked at start-up without the data,
    and again by the stage with it)."""
    ckpt_dir = Path(run_dir) / rundir.CHECKPOINTS
    entry = newest_valid(ckpt_dir)
    if entry is None:
        raise ModelError(f"train.resume: no usable checkpoint in {ckpt_dir} (point hydra.run.dir at the "
                         f"interrupted run's folder)")
    _, meta = read_adapter(ckpt_dir / entry["adapter"], "train.resume")
    differ = [f"lora.{k}={mine} (checkpoint: {recorded})" for k, (mine, recorded) in lora_differences(meta, cfg.lora).items()]
    if differ:
        raise ModelError(f"train.resume: the checkpoint was trained with other LoRA settings: {', '.join(differ)}")
    recorded = read_run_record(ckpt_dir)
    if recorded is not None:
        settings = settings or training_settings(cfg)
        if "data" not in settings:
            recorded = {k: v for k, v in recorded.items() if k != "data"}
        differ = [f"{k}={mine} (checkpoint: {old})" for k, (mine, old) in setting_differences(recorded, settings).items()]
        if differ:
            raise ModelError(f"train.resume: the checkpoints in {ckpt_dir} were trained with other settings: "
                             f"{', '.join(differ)}; resume with the same ones, or start a new run "
                             "(train.overwrite=true, or another hydra.run.dir)")
    return entry


# What a resumed run must share with the checkpoints it continues: everything that changes the
# math of the remaining steps or the data they see. (The save count does not; the global
# batch, not the per-device one, fixes the data order, so a resume may change the device count.)
SETTINGS = ("lora.rank", "lora.alpha", "lora.dropout", "lora.target_modules", "optimizer.name",
            "optimizer.learning_rate", "optimizer.beta1", "optimizer.beta2", "optimizer.eps",
            "optimizer.weight_decay", "optimizer.warmup_ratio", "optimizer.max_grad_norm", "train.epochs",
            "train.max_steps", "train.shuffle", "train.packing", "seed", "model.name", "model.seq_length", "model.checkpoint",
            "hardware.compute_dtype", "hardware.loss_scale.kind", "hardware.micro_batch_tokens")
