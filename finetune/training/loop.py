"""Stage `train`: LoRA fine-tuning in MindSpore graph mode. Also the jit step and the loop that
the demo's base pretraining (finetune/training/base.py) runs.

The step is `ms.value_and_grad` + optional `mindspore.amp.DynamicLossScaler` + global-norm
clipping + MindFormers AdamW, each inside `@ms.jit`: `nn.TrainOneStepWithLossScaleCell` does not
run on CPU (NPUGetFloatStatusV2), while this form runs on CPU and Ascend alike.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from finetune.config.schema import TrainConfig
from finetune.data.batches import batch_inputs, labelled_per_row
from finetune.data.packing import PackedRows, step_inputs
from finetune.data.packing import labelled_per_row as packed_labels_per_row
from finetune.data.records import IGNORE_ID
from finetune.errors import ModelError, TrainingDiverged
from finetune.model.checkpoint import read_checkpoint
from finetune.model.forward import answer_loss_cell, packed_loss_cell
from finetune.training.train_log import format_row, open_log

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Which rows each optimizer step takes: batch_size x accumulation rows of this rank's shard
    per step, `epochs` passes (capped at max_steps), batch order drawn from (seed, epoch)."""
    batch_size: int
    epochs: int
    seed: int
    accumulation: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    # Under dynamic loss scaling, a non-finite step is an overflow: skipped, the scale halved. This
    # many in a row means the run diverged, not the scale. Without loss scaling: the first one.
    max_nonfinite_steps: int = TrainConfig.max_nonfinite_steps


@dataclass(frozen=True)
class Feed:
    """What run_steps trains on. rows: rows per rank (steps per epoch = rows // (batch x
    accumulation)); loss_cell(net): the Cell whose output is the loss; micro(k, m, b, acc):
    (inputs, tokens processed, real tokens) of micro-batch m of global batch k on this rank,
    the token counts over all ranks."""
    rows: int
    loss_cell: object
    micro: object
    packed: bool = False


def row_feed(ids: np.ndarray, labels: np.ndarray, pad_id: int, sparse: bool, world: int = 1) -> Feed:
    """Rows of this rank's shard as they are ([N, seq_length + 1]). sparse: each batch cut to a
    length bucket and the loss taken at the labelled positions only (batches.batch_inputs: the
    same loss and gradients as the full model); else the model's own loss over every position
    (pretraining on packed text)."""
    answers_per_row = labelled_per_row(labels) if sparse else None

    def micro(k: int, m: int, b: int, accumulation: int):
        rows = slice((k * accumulation + m) * b, (k * accumulation + m + 1) * b)
        arrays, processed = batch_inputs(ids[rows], labels[rows], pad_id, answers_per_row)
        return arrays, processed * world, int((ids[rows][:, :-1] != pad_id).sum()) * world  # every rank takes as many

    return Feed(rows=len(ids), loss_cell=answer_loss_cell if sparse else (lambda net: net), micro=micro)


def packed_feed(packed: PackedRows, rank: int = 0, world: int = 1) -> Feed:
    """Packed rows (data/packing.py), all of them on every rank: global batch k is rows k*G ..
    (k+1)*G - 1 (G = batch x accumulation x world) whatever the device count; micro-batch m of
    rank r takes b of them. Each labelled position is weighted by acc x world / (labelled
    positions of the whole optimizer step), so after the step averages micro-batches and ranks
    the loss is the step's mean over its labelled tokens, however they fall on rows and ranks."""
    k_per_row = packed_labels_per_row(packed.targets)
    labelled = (packed.targets != IGNORE_ID).sum(axis=1)
    real = (packed.segments > 0).sum(axis=1)
    length = packed.tokens.shape[1]

    def micro(k: int, m: int, b: int, accumulation: int):
        g = b * accumulation * world
        weight = accumulation * world / max(int(labelled[k * g:(k + 1) * g].sum()), 1)
        start = k * g + m * world * b      # this micro-batch, every rank
        index = np.arange(start + rank * b, start + (rank + 1) * b)
        return (step_inputs(packed, index, k_per_row, weight), world * b * length,
                int(real[start:start + world * b].sum()))

    return Feed(rows=len(packed) // world, loss_cell=packed_loss_cell, micro=micro, packed=True)


def make_optimizer(params, opt_cfg, total_steps: int):
    from mindformers.core.lr import CosineWithWarmUpLR
    from mindformers.core.optim import AdamW

    lr = CosineWithWarmUpLR(learning_rate=opt_cfg.learning_rate, warmup_ratio=opt_cfg.warmup_ratio,
                            total_steps=max(total_steps, 1))
    opt = AdamW(params, learning_rate=lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
                weight_decay=opt_cfg.weight_decay)
    return opt, lr


def make_step(net, opt, loss_scale, max_grad_norm: float, accumulation: int, world: int = 1):
    """(micro_step, step, apply, scaler) for one optimizer step over `accumulation` micro-batches.
    `net(*inputs)` returns the loss: the model itself (input_ids, labels), or forward.answer_loss_cell.

    accumulation == 1: step(*inputs) -> (scaled loss, grad norm, finite): gradients, unscale, the
    overflow check, clipping and the update (skipped on overflow) in one fused graph.
    accumulation > 1: micro_step(*inputs) -> scaled loss, for every micro-batch: adds its gradients
    to fp32 buffers (Parameters, so no gradient tuple is handed from one jit call to another: that
    costs ~2.5 s per step on CPU here, against ~0.35 s for the whole fused step); then apply() ->
    (grad norm, finite) averages the buffers and does the rest. Only micro_step holds activations:
    one such graph, not two (a graph keeps its buffers for the life of the process, and at
    seq_length 2048 the 128M model's training graph holds ~15 GB on CPU).

    Data parallel (world > 1, msrun workers after communication.init()): gradients and loss are
    averaged over the ranks with AllReduce inside the same graph, before unscaling, the overflow
    check and clipping, so every rank applies the identical update. (MindSpore's DATA_PARALLEL
    auto-parallel mode does not compile MindFormers' Llama in graph mode on CPU with MindSpore 2.9,
    as measured on this project's CPU machines.)"""
    import mindspore as ms
    from mindspore import amp, ops

    scaler = None   # loss_scale.kind is a schema enum: none | dynamic
    if loss_scale.kind == "dynamic":
        scaler = amp.DynamicLossScaler(loss_scale.init_scale, int(loss_scale.factor), loss_scale.window)

    if scaler is None:
        def forward(*inputs):
            return net(*inputs)
    else:
        def forward(*inputs):
            return scaler.scale(net(*inputs))
    grad_fn = ms.value_and_grad(forward, None, opt.parameters)
    buffers = ms.ParameterTuple([ms.Parameter(ops.zeros(p.shape, ms.float32), name=f"accum.{p.name}",
                                              requires_grad=False)
                                 for p in opt.parameters]) if accumulation > 1 else ()

    allreduce = ops.AllReduce() if world > 1 else None   # sum over ranks

    def update(loss, grads):
        """All ranks' mean, unscale, overflow check, norm, clipping, the optimizer (if finite)."""
        if world > 1:
            loss = allreduce(loss) / world
            grads = tuple(allreduce(g) / world for g in grads)
        if scaler is not None:
            grads = scaler.unscale(grads)
        finite = amp.all_finite(grads)
        norm = ops.sqrt(ops.addn([ops.reduce_sum(ops.square(g.astype(ms.float32))) for g in grads]))
        if max_grad_norm > 0:
            grads = ops.clip_by_global_norm(grads, max_grad_norm)
        if finite:
            opt(grads)
        if scaler is not None:
            scaler.adjust(finite)
        return loss, norm, finite

    @ms.jit
    def micro_step(*inputs):
        loss, grads = grad_fn(*inputs)
        for buf, g in zip(buffers, grads):
            ops.assign_add(buf, g.astype(ms.float32))
        if world > 1:
            loss = allreduce(loss) / world
        return loss

    @ms.jit
    def step(*inputs):
        loss, grads = grad_fn(*inputs)
        return update(loss, grads)

    @ms.jit
    def apply():
        grads = tuple(buf / accumulation for buf in buffers)
        for buf in buffers:
            ops.assign(buf, ops.zeros_like(buf))
        # the loss was averaged over the ranks by micro_step already; a zero placeholder here
        _, norm, finite = update(ops.zeros((), ms.float32), grads)
        return norm, finite

    return micro_step, step, apply, scaler


def batch_order(num_batches: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of an epoch's global batches. Batch composition is fixed by the shuffled shards
    (data/mindrecord.write_shards); each epoch visits the batches in a new order drawn from
    (seed, epoch) alone, so every rank agrees, the order does not depend on the device count,
    and a resumed run can jump straight to any step."""
    if not shuffle:
        return np.arange(num_batches)
    return np.random.default_rng([seed, epoch]).permutation(num_batches)


def optimizer_state(opt, scaler) -> list:
    """[(name, Parameter)] that resume must restore besides the adapter: AdamW's moments and
    global_step (the LR schedule reads it), the dynamic loss scale and its growth counter."""
    trained = {id(p) for p in opt.parameters}
    state = [(p.name, p) for p in opt.get_parameters() if id(p) not in trained]
    if scaler is not None:
        state += [("loss_scale.scale_value", scaler.scale_value), ("loss_scale.counter", scaler.counter)]
    return state


def load_optimizer_state(state: list, path: Path) -> None:
    import mindspore as ms

    saved = read_checkpoint(path, "train.resume")
    missing = [name for name, _ in state if name not in saved]
    if missing:
        raise ModelError(f"train.resume: {path} lacks optimizer state {missing[:3]} "
                         f"(was it written with other optimizer/loss-scale settings?)")
    for name, p in state:
        p.set_data(ms.Tensor(saved[name], p.dtype))


def packed_step_rows(cfg, examples: int, rows: int) -> tuple[int, int, int]:
    """For `examples` prepared examples packed into `rows` rows: (rows per device per optimizer
    step, rows per micro-step, micro-steps per optimizer step): train.batch_size examples per
    device (data/packing.rows_per_step), cut to hardware.micro_batch_tokens positions per micro-step
    (data/packing.micro_batches) on top of parallel.gradient_accumulation_steps."""
    from finetune.data import micro_batches, rows_per_step

    accumulation = cfg.parallel.gradient_accumulation_steps
    parts = cfg.parallel.data_parallel * accumulation
    per_step = rows_per_step(cfg.train.batch_size * parts, examples, rows, parts)
    per_micro, extra = micro_batches(per_step, cfg.model.seq_length, cfg.hardware.micro_batch_tokens)
    return per_step, per_micro, accumulation * extra


def total_steps(rows: int, rows_per_step: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: whole steps per epoch (this rank's rows) x epochs, capped by max_steps."""
    total = rows // rows_per_step * epochs
    return total if max_steps is None else min(total, max_steps)


@dataclass(frozen=True)
class TrainingJob:
    """One training loop's inputs: LoRA fine-tuning (stages/train.py) and the demo's base pretraining
    (training/base.py) both build one and hand it to run_steps."""
    net: Any                        # the network; its parameters with requires_grad are trained
    feed: Feed                      # each micro-batch's inputs: row_feed or packed_feed
    schedule: Schedule
    optimizer: Any                  # the optimizer config group (AdamW, cosine schedule, clipping)
    hardware: Any                   # the hardware config group (loss scaling)
    tracker: Any                    # step metrics go here (finetune.runtime.context.Tracker)
    metric_prefix: str = "train_"   # train_loss, pretrain_loss, ...
    desc: str = "train"             # the progress bar's label
    world: int = 1                  # data-parallel ranks taking part in every step
    log_file: Path | None = None    # train_log.csv (rank 0 only)
    save_at: tuple[int, ...] = ()   # steps after which on_save(step, state) runs
    on_save: Callable | None = None
    resume: tuple[int, Path] | None = None   # (step, state file): continue after that step
    on_step: Callable | None = None  # on_step(step, last) after every step; True stops (early stopping)


def run_steps(job: TrainingJob) -> dict:
    """The training loop. One optimizer step takes batch_size x accumulation rows of the feed on
    every rank; on_save gets state = optimizer_state(...), which resume loads back."""
    import mindspore as ms

    net, feed, schedule, opt_cfg, tracker = job.net, job.feed, job.schedule, job.optimizer, job.tracker
    prefix, resume_state, on_step = job.metric_prefix, job.resume, job.on_step
    batch_size, accumulation, seed = schedule.batch_size, schedule.accumulation, schedule.seed
    per_step = batch_size * accumulation
    steps_per_epoch = feed.rows // per_step
    if steps_per_epoch == 0:
        what = "packed rows" if feed.packed else "training examples"
        raise ModelError(f"train.batch_size={batch_size} x gradient_accumulation_steps={accumulation} is more "
                         f"than the {feed.rows} {what} (per device)")
    total = total_steps(feed.rows, per_step, schedule.epochs, schedule.max_steps)
    params = [p for p in net.get_parameters() if p.requires_grad]
    opt, lr_schedule = make_optimizer(params, opt_cfg, total)
    loss_net = feed.loss_cell(net)
    micro_step, full_step, apply_step, scaler = make_step(loss_net, opt, job.hardware.loss_scale, opt_cfg.max_grad_norm,
                                              accumulation, job.world)
    state = optimizer_state(opt, scaler)
    start = 0
    if resume_state is not None:
        start, state_file = resume_state
        load_optimizer_state(state, state_file)
        log.info("resumed after step %d of %d (%s)", start, total, state_file)
    net.set_train(True)

    def current_scale() -> float:
        return float(scaler.scale_value.asnumpy()) if scaler is not None else 1.0

    log_rows = open_log(job.log_file, start)
    losses, tokens_done, timed_tokens, timed_seconds, skipped, processed, shapes = [], 0, 0, 0.0, 0, 0, set()
    all_seconds = 0.0   # every step, compiles included
    nonfinite_run = 0   # non-finite steps in a row
    limit = schedule.max_nonfinite_steps if scaler is not None else 1
    order, order_epoch = None, -1
    bar = tqdm(total=total, initial=start, desc=job.desc, unit="step", dynamic_ncols=True)
    for step in range(start + 1, total + 1):
        epoch, s = divmod(step - 1, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = batch_order(steps_per_epoch, epoch, seed, schedule.shuffle), epoch
        k = int(order[s])
        t0 = time.perf_counter()
        loss_sum, step_tokens, scale, compiled = 0.0, 0, current_scale(), False
        for m in range(accumulation):
            arrays, n_processed, n_real = feed.micro(k, m, batch_size, accumulation)
            processed += n_processed
            # a new shape (the fused step's, or the micro-step's): this step compiles a graph
            key = (accumulation > 1, arrays[0].shape)
            compiled |= key not in shapes
            shapes.add(key)
            inputs = tuple(ms.Tensor(a) for a in arrays)
            if accumulation > 1:
                loss = micro_step(*inputs)
            else:
                loss, norm, finite = full_step(*inputs)
            loss_sum += float(loss.asnumpy().item()) / scale
            step_tokens += n_real
        if accumulation > 1:
            compiled |= ("apply",) not in shapes   # the small update graph, compiled on the first step
            shapes.add(("apply",))
            norm, finite = apply_step()
        dt = time.perf_counter() - t0
        all_seconds += dt
        loss_value = loss_sum / accumulation
        finite = bool(finite.asnumpy()) and math.isfinite(loss_value)
        skipped += not finite
        nonfinite_run = 0 if finite else nonfinite_run + 1
        losses.append(loss_value)
        tokens_done += step_tokens
        if not compiled:  # a step that compiled a graph (a new shape) is not a measure of speed
            timed_tokens += step_tokens
            timed_seconds += dt
        lr = float(lr_schedule(ms.Tensor(step - 1, ms.int32)).asnumpy())
        tps = step_tokens / dt
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}")
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(norm.asnumpy()),
               "tokens_per_s": tps, "loss_scale": current_scale()}
        # MLflow keeps finite points only (tracking.Tracker): the count says when there were others
        tracker.log_metrics({**{f"{prefix}{key}": v for key, v in row.items() if key != "step"},
                             f"{prefix}nonfinite_steps": skipped}, step=step)
        if log_rows:
            log_rows.write(format_row({**row, "step": step}))
            log_rows.flush()
        if nonfinite_run >= limit:
            bar.close()
            if log_rows:
                log_rows.close()
            tracker.flush()
            why = "without loss scaling" if scaler is None else f"{nonfinite_run} steps in a row under loss scaling"
            raise TrainingDiverged(
                f"training diverged at step {step}: loss {loss_value:.6g}, gradient norm {row['grad_norm']:.6g} "
                f"(not finite, {why}); no adapter written from it, the checkpoints saved before are kept "
                f"(lower optimizer.learning_rate, currently {opt_cfg.learning_rate:g})")
        if step in job.save_at and job.on_save is not None:
            job.on_save(step, state)
        if on_step is not None and on_step(step, step == total):
            log.info("early stopping after step %d of %d", step, total)
            total = step
            break
    bar.close()
    if log_rows:
        log_rows.close()
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else float("nan")
    return {"steps": total, "steps_this_run": total - start, "loss_first": losses[0] if losses else float("nan"),
            "loss_last": losses[-1] if losses else float("nan"), "losses": losses, "tokens_per_s": tokens_per_s,
            "tokens_per_s_all_steps": tokens_done / all_seconds if all_seconds else float("nan"),
            "tokens": tokens_done, "overflow_steps": skipped, "seconds": timed_seconds, "seconds_all_steps": all_seconds,
            # padded / processed tokens, and how many step graphs were compiled (one per input shape
            # and kind: the accumulating micro-step and the updating step are two graphs)
            "pad_fraction": 1 - tokens_done / processed if processed else float("nan"), "shapes": len(shapes)}
















