"""Stage `merge`: fold the run's LoRA adapter into its base, W' = W + (alpha / rank) * B @ A
(finetune/model/adapter.py), and save a full checkpoint without adapter parameters, marked as merged.
alpha / rank come from the adapter file itself, never from the command line."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from finetune import rundir
from finetune.errors import ModelError
from finetune.model import (
    adapter_path,
    base_tensors,
    merge_lora,
    read_adapter,
    refuse_merged_base,
    save_merged,
)

log = logging.getLogger(__name__)


def merge(ctx) -> dict:
    """Merge the run's adapter (eval.adapter, else run_dir/adapter.ckpt) into the base ->
    run_dir/merged.ckpt; with merge.all also checkpoints/adapter-stepN.ckpt -> merged-stepN.ckpt."""
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    adapter = adapter_path(cfg, run_dir)
    if not adapter.is_file():
        raise ModelError(f"merge: adapter checkpoint {adapter} not found (run the train stage first, "
                         f"or point eval.adapter at one)")
    refuse_merged_base(cfg.model.checkpoint)
    jobs = [(adapter, run_dir / rundir.MERGED)]
    if cfg.merge.all:
        # adapter-step<N>.ckpt only: not a temp file (.adapter-step<N>.tmp<pid>.ckpt) left by a crashed save
        steps = sorted(p for p in (run_dir / rundir.CHECKPOINTS).glob("adapter-step*.ckpt")
                       if re.fullmatch(r"adapter-step\d+\.ckpt", p.name))
        if not steps:
            log.warning("merge.all: no adapter-step*.ckpt in %s; merging the final adapter only", run_dir / rundir.CHECKPOINTS)
        jobs += [(p, p.with_name("merged-" + p.name[len("adapter-"):])) for p in steps]
    # Read every adapter first: a bad file fails before the (large) base is loaded.
    adapters = [read_adapter(src, "merge") for src, _ in jobs]
    base = base_tensors(ctx.base_checkpoint)
    tags = {}
    for (src, dst), (tensors, meta) in zip(jobs, adapters):
        scaling = meta["alpha"] / meta["rank"]
        save_merged(merge_lora(base, tensors, scaling), dst, src, scaling)
        log.info("merged %s (rank %d, alpha %g: scaling %g) -> %s", src, meta["rank"], meta["alpha"], scaling, dst)
        tags["merged" if dst.name == rundir.MERGED else f"merged.{dst.stem.removeprefix('merged-')}"] = str(dst)
    scaling = adapters[0][1]["alpha"] / adapters[0][1]["rank"]   # the run's final adapter
    # Full checkpoints are large (14 GB for InternLM-7B): their paths are tagged, not uploaded.
    ctx.tracker.set_tags({**tags, "lora_scaling": scaling})
    out = {"merged": str(run_dir / rundir.MERGED), "merged_checkpoints": len(jobs) - 1, "lora_scaling": scaling}
    # ... but the merged model is logged as an MLflow model (tracking.log_model), which copies it
    from finetune.tracking import log_merged_model

    return {**out, **log_merged_model(ctx, run_dir / rundir.MERGED)}
