"""The train stage: LoRA on the prepared MindRecord rows (packed into rows of model.seq_length by
default) with the compiled step of training/loop.py; writes adapter.ckpt, the evenly spaced
checkpoints and train_log.csv into the run dir."""
from __future__ import annotations

import logging
from pathlib import Path

from finetune import rundir
from finetune.data import TRAIN_RECORDS, pack, pad_fraction, read_all_shards, read_shards
from finetune.model import apply_lora, count_params, load_adapter, param_summary, save_adapter, save_checkpoint
from finetune.training import (
    Schedule,
    TrainingJob,
    add_to_index,
    check_fresh_run_dir,
    packed_feed,
    packed_step_rows,
    read_rows,
    resume_point,
    row_feed,
    run_steps,
    save_steps,
    total_steps,
    training_settings,
    write_run_record,
)

log = logging.getLogger(__name__)


def train(ctx) -> dict:
    """LoRA-train on this rank's MindRecord shard; rank 0 saves run_dir/adapter.ckpt and the
    evenly spaced checkpoints (run_dir/checkpoints/) that merge and resume read."""
    cfg, run_dir, r = ctx.cfg, ctx.run_dir, ctx.rank
    dp = cfg.parallel.data_parallel
    records = ctx.prepared / TRAIN_RECORDS
    batch, accumulation = cfg.train.batch_size, cfg.parallel.gradient_accumulation_steps
    if cfg.train.packing:   # every rank packs every example the same way and takes its rows
        ids, labels = read_all_shards(records, dp)
        packed = pack(ids, labels, ctx.tok.pad_id, cfg.model.seq_length, cfg.seed)
        feed = packed_feed(packed, r, dp)
        rows, batch, accumulation = packed_step_rows(cfg, len(ids), len(packed))
        extra = accumulation // cfg.parallel.gradient_accumulation_steps
        log.info("packed %d examples into %d rows of %d positions (%.2f per row, %.1f%% padding); "
                 "train.batch_size=%d examples -> %d row(s) per device per step%s", len(ids), len(packed),
                 cfg.model.seq_length, len(ids) / len(packed), 100 * pad_fraction(packed), cfg.train.batch_size,
                 rows, f", as {extra} micro-steps of {batch} (hardware.micro_batch_tokens="
                 f"{cfg.hardware.micro_batch_tokens})" if extra > 1 else "")
    else:                   # this rank's shard, each batch cut to a length bucket
        ids, labels = read_shards(records, num_shards=dp, shard_id=r)
        feed = row_feed(ids, labels, ctx.tok.pad_id, sparse=True, world=dp)
    net = apply_lora(ctx.load_base(batch), cfg.lora, cfg.seed)
    counts = count_params(net)
    log.info("trainable %s of %s base parameters (%.4f%%)", f"{counts['trainable']:,}", f"{counts['base']:,}",
             100 * counts["trainable"] / counts["base"])

    ckpt_dir = run_dir / rundir.CHECKPOINTS
    resume_state = None
    settings = training_settings(cfg, ctx.prepared)
    if cfg.train.resume:
        entry = resume_point(cfg, run_dir, settings)
        load_adapter(net, ckpt_dir / entry["adapter"], "train.resume")
        resume_state = (entry["step"], ckpt_dir / entry["state"])
        ctx.tracker.set_tags({"resumed_from_step": entry["step"]})
        # The same MLflow run continues: steps it has are not logged twice, and the steps up to the
        # checkpoint that the interrupted run computed but never sent (killed between two flushes)
        # are sent from train_log.csv, so the curve has every step once.
        logged = ctx.tracker.continue_steps("train_loss")
        if r == 0 and logged < entry["step"]:
            for row in read_rows(run_dir / rundir.TRAIN_LOG, logged + 1, entry["step"]):
                ctx.tracker.log_metrics({f"train_{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            ctx.tracker.flush()
    elif r == 0:
        check_fresh_run_dir(cfg, run_dir, clear=True)
        write_run_record(ckpt_dir, settings)

    schedule = Schedule(batch_size=batch, epochs=cfg.train.epochs, seed=cfg.seed,
                        accumulation=accumulation, max_steps=cfg.train.max_steps,
                        shuffle=cfg.train.shuffle, max_nonfinite_steps=cfg.train.max_nonfinite_steps)
    total = total_steps(feed.rows, schedule.batch_size * schedule.accumulation, schedule.epochs, schedule.max_steps)
    save_at = save_steps(total, cfg.train.save.num_checkpoints)

    def on_save(step: int, state: list) -> None:
        if r != 0:
            return  # one logical checkpoint: every rank holds the same weights, rank 0 writes them
        files = {"adapter": ckpt_dir / f"adapter-step{step:06d}.ckpt", "state": ckpt_dir / f"state-step{step:06d}.ckpt"}
        save_adapter(net, files["adapter"])
        save_checkpoint(state, files["state"])
        add_to_index(ckpt_dir, step, files)
        ctx.tracker.log_metrics({"checkpoint_step": step}, step=step)
        ctx.tracker.log_artifact(files["adapter"], rundir.CHECKPOINTS)

    during, best_file = None, run_dir / rundir.BEST_ADAPTER
    if cfg.eval.every_n_steps:
        from finetune.training import DuringTraining

        during = DuringTraining(ctx, net, cfg.train.batch_size)

    def on_step(step: int, last: bool) -> bool:
        """eval.every_n_steps: the during-training figures; early stopping keeps the best adapter.
        Every rank measures (the same weights, the same questions), so every rank stops together."""
        if during is None or (step % cfg.eval.every_n_steps and not last):
            return False
        figures = during.measure(step)
        ctx.tracker.log_metrics(figures, step=step)
        if during.improved(step, figures) and r == 0:
            save_adapter(net, best_file)
        return during.should_stop and not last

    stats = run_steps(TrainingJob(net, feed, schedule, cfg.optimizer, cfg.hardware, ctx.tracker,
                                  metric_prefix="train_", desc="LoRA train", world=dp,
                                  log_file=run_dir / rundir.TRAIN_LOG if r == 0 else None, save_at=tuple(save_at),
                                  on_save=on_save, resume=resume_state, on_step=on_step))
    if r == 0:
        save_adapter(net, run_dir / rundir.ADAPTER)
        if during is not None and during.best_step is not None:   # early stopping: the best one is kept
            best_file.replace(run_dir / rundir.ADAPTER)
    during_figures = {} if during is None else {
        "during_seconds": round(during.seconds, 1), "during_evaluations": during.evaluations,
        **({"early_stopping_best_step": during.best_step, "early_stopping_best": during.best,
            "early_stopped": stats["steps"] < total} if during.metric else {})}
    losses = logged_losses(run_dir / rundir.TRAIN_LOG) if r == 0 else stats["losses"]
    return {
        "train_loss_first": losses[0] if losses else stats["loss_first"],
        "train_loss_last": stats["loss_last"],
        "train_tokens_per_s": stats["tokens_per_s"],
        "train_tokens_per_s_all_steps": stats["tokens_per_s_all_steps"],
        "train_pad_fraction": stats["pad_fraction"],
        "train_shapes": stats["shapes"],
        "train_packing": bool(cfg.train.packing),
        **({"train_packed_rows": len(packed), "train_examples_per_row": len(ids) / len(packed),
            "train_rows_per_step": rows, "train_micro_steps": accumulation} if cfg.train.packing else {}),
        "train_steps": stats["steps"],
        "train_steps_this_run": stats["steps_this_run"],
        "train_overflow_steps": stats["overflow_steps"],
        "train_examples": int(len(ids)) * (1 if cfg.train.packing else dp),
        "train_global_batch": cfg.train.batch_size * cfg.parallel.gradient_accumulation_steps * dp,   # examples (on average, packed)
        rundir.CHECKPOINTS: len(save_at),
        "adapter": str(run_dir / rundir.ADAPTER),
        **during_figures,
        **param_summary(counts),
    }


def logged_losses(log_file: Path) -> list[float]:
    return [r["loss"] for r in read_rows(log_file)]
